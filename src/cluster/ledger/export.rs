//! A month of records streamed out of PostgreSQL with `COPY (…) TO STDOUT (FORMAT binary)`,
//! on a connection of its own (a slow client must not hold up the shared one). Each record is
//! rendered again from its row (`Record::from_json`, then `write_json`): jsonb keeps neither
//! key order nor spacing, and this gives the bytes the embedded export gives.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use http_body::Frame;
use tokio::sync::mpsc;

use super::LedgerError;
use crate::body::BoxError;
use crate::clock::Month;
use crate::cluster::Pg;
use crate::ledger::Record;

/// The signature, flags and header extension length that open binary COPY data.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Where the chunks of an export go.
pub type Chunks = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// Starts the COPY of month `m` (connection failures are returned here, before any byte is
/// sent); a task then calls `render` for every record's JSON, oldest first, and sends `buf`
/// to `tx` whenever it holds 60 KB or more.
pub async fn start(
    pg: &Pg,
    m: Month,
    mut buf: String,
    mut render: impl FnMut(&mut String, &[u8]) + Send + 'static,
    tx: Chunks,
) -> Result<(), LedgerError> {
    let client = pg.connect().await?;
    let sql = format!(
        "COPY (SELECT record FROM gm_usage_records WHERE created_at >= '{}' AND created_at < '{}' \
         ORDER BY created_at, id) TO STDOUT (FORMAT binary)",
        m.start().format("%Y-%m-%d %H:%M:%S+00"),
        m.next().start().format("%Y-%m-%d %H:%M:%S+00"),
    );
    let stream = client.copy_out(&sql).await?;
    tokio::spawn(async move {
        // The connection lives as long as the copy.
        let _client = client;
        let mut stream = std::pin::pin!(stream);
        let mut parser = Parser::default();
        let mut json = Vec::with_capacity(2048);
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e))).await;
                    return;
                }
            };
            let res = parser.feed(&chunk, |raw| {
                json.clear();
                match serde_json::from_slice(raw).ok().and_then(|v| Record::from_json(&v)) {
                    Some(r) if r.write_json(&mut json).is_ok() => render(&mut buf, &json),
                    _ => tracing::error!("export: a row of gm_usage_records is not a record; skipped"),
                }
            });
            if let Err(e) = res {
                let _ = tx.send(Err(Box::new(e))).await;
                return;
            }
            if buf.len() >= 60 * 1024
                && tx
                    .send(Ok(Frame::data(Bytes::from(std::mem::take(&mut buf)))))
                    .await
                    .is_err()
            {
                return;
            }
        }
        if !buf.is_empty() {
            let _ = tx.send(Ok(Frame::data(Bytes::from(buf)))).await;
        }
    });
    Ok(())
}

/// Splits binary COPY data (arriving in chunks of any size) into the one column of each row.
#[derive(Default)]
struct Parser {
    pending: BytesMut,
    header_done: bool,
}

impl Parser {
    /// Adds a chunk; calls `row` with the jsonb text of each complete row.
    fn feed(&mut self, chunk: &[u8], mut row: impl FnMut(&[u8])) -> Result<(), LedgerError> {
        self.pending.extend_from_slice(chunk);
        if !self.header_done {
            if self.pending.len() < SIGNATURE.len() + 8 {
                return Ok(());
            }
            if &self.pending[..SIGNATURE.len()] != SIGNATURE {
                return Err(bad("signature"));
            }
            let ext = u32::from_be_bytes(self.pending[15..19].try_into().map_err(|_| bad("header"))?) as usize;
            if self.pending.len() < 19 + ext {
                return Ok(());
            }
            self.pending.advance(19 + ext);
            self.header_done = true;
        }
        loop {
            if self.pending.len() < 2 {
                return Ok(());
            }
            let fields = i16::from_be_bytes([self.pending[0], self.pending[1]]);
            if fields == -1 {
                self.pending.clear();
                return Ok(());
            }
            if fields != 1 || self.pending.len() < 6 {
                return if fields != 1 { Err(bad("field count")) } else { Ok(()) };
            }
            let len = i32::from_be_bytes(self.pending[2..6].try_into().map_err(|_| bad("length"))?);
            let len = usize::try_from(len).map_err(|_| bad("null record"))?;
            if self.pending.len() < 6 + len {
                return Ok(());
            }
            // jsonb's binary form: a version byte (1), then the text.
            if len < 1 || self.pending[6] != 1 {
                return Err(bad("jsonb version"));
            }
            row(&self.pending[7..6 + len]);
            self.pending.advance(6 + len);
        }
    }
}

fn bad(what: &str) -> LedgerError {
    LedgerError::Invalid(format!("unexpected COPY data ({what})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(rows: &[&str]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        for r in rows {
            out.extend_from_slice(&1i16.to_be_bytes());
            out.extend_from_slice(&(r.len() as i32 + 1).to_be_bytes());
            out.push(1);
            out.extend_from_slice(r.as_bytes());
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    #[test]
    fn rows_are_found_whatever_the_chunk_boundaries() {
        let data = copy_data(&["{\"a\": 1}", "{}", "{\"b\": \"x,y\"}"]);
        for size in [1, 2, 3, 7, 19, 64, 1000] {
            let mut p = Parser::default();
            let mut seen = Vec::new();
            for chunk in data.chunks(size) {
                p.feed(chunk, |r| seen.push(String::from_utf8(r.to_vec()).unwrap()))
                    .unwrap();
            }
            assert_eq!(seen, ["{\"a\": 1}", "{}", "{\"b\": \"x,y\"}"], "chunks of {size}");
        }
    }
}

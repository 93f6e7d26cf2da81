//! Metering of compressed response bodies: the proxy forwards the original
//! bytes untouched while a side decoder feeds the plain bytes to a [`Scanner`].

use std::io::{self, Write};

use brotli_decompressor::DecompressorWriter;
use flate2::write::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};

use super::scan::{Format, ScanSummary, Scanner};

/// Size of the brotli decoder's output buffer.
const BROTLI_BUFFER: usize = 16 << 10;

/// Decompresses a response body as it streams (per Content-Encoding) and feeds the plain bytes to a Scanner; the proxy forwards the original compressed bytes untouched.
pub struct DecodingScanner {
    codec: Codec,
    format: Format,
    /// The compressed stream was corrupt; later bytes are ignored.
    failed: bool,
}

/// Forwards decompressed bytes into the scanner.
struct Sink(Scanner);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Codec {
    Plain(Scanner),
    Gzip(MultiGzDecoder<Sink>),
    Zlib(ZlibDecoder<Sink>),
    Deflate(DeflateDecoder<Sink>),
    Brotli(Box<DecompressorWriter<Sink>>),
    /// `deflate` before its first two bytes arrived: zlib or raw deflate is not known yet.
    SniffDeflate(Vec<u8>, Scanner),
}

impl DecodingScanner {
    /// Creates a decoder for `content_encoding`: gzip, x-gzip, deflate (zlib,
    /// falling back to raw deflate) and br are decoded; identity, none and
    /// unknown encodings are scanned as they are.
    pub fn new(content_encoding: Option<&str>, format: Format) -> Self {
        let scanner = Scanner::new(format);
        let enc = content_encoding.map(str::trim).unwrap_or_default();
        let is = |name: &str| enc.eq_ignore_ascii_case(name);
        let codec = if is("gzip") || is("x-gzip") {
            Codec::Gzip(MultiGzDecoder::new(Sink(scanner)))
        } else if is("deflate") {
            Codec::SniffDeflate(Vec::new(), scanner)
        } else if is("br") {
            Codec::Brotli(Box::new(DecompressorWriter::new(Sink(scanner), BROTLI_BUFFER)))
        } else {
            Codec::Plain(scanner)
        };
        Self {
            codec,
            format,
            failed: false,
        }
    }

    /// Feeds the next compressed bytes, exactly as received from the upstream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed || bytes.is_empty() {
            return;
        }
        let result = match &mut self.codec {
            Codec::Plain(s) => {
                s.feed(bytes);
                Ok(())
            }
            Codec::Gzip(d) => write_flush(d, bytes),
            Codec::Zlib(d) => write_flush(d, bytes),
            Codec::Deflate(d) => write_flush(d, bytes),
            Codec::Brotli(d) => d.write_all(bytes),
            Codec::SniffDeflate(head, _) => {
                head.extend_from_slice(bytes);
                if head.len() < 2 {
                    return;
                }
                self.start_deflate()
            }
        };
        if result.is_err() {
            self.failed = true;
        }
    }

    /// True once the decoded body held an error object.
    pub fn has_error(&self) -> bool {
        match &self.codec {
            Codec::Plain(s) | Codec::SniffDeflate(_, s) => s.has_error(),
            Codec::Gzip(d) => d.get_ref().0.has_error(),
            Codec::Zlib(d) => d.get_ref().0.has_error(),
            Codec::Deflate(d) => d.get_ref().0.has_error(),
            Codec::Brotli(d) => d.get_ref().0.has_error(),
        }
    }

    /// What the scanner learned from the decompressed bytes so far.
    pub fn summary(&self) -> ScanSummary {
        match &self.codec {
            Codec::Plain(s) | Codec::SniffDeflate(_, s) => s.summary(),
            Codec::Gzip(d) => d.get_ref().0.summary(),
            Codec::Zlib(d) => d.get_ref().0.summary(),
            Codec::Deflate(d) => d.get_ref().0.summary(),
            Codec::Brotli(d) => d.get_ref().0.summary(),
        }
    }

    /// Picks zlib or raw deflate from the first two bytes and replays them.
    fn start_deflate(&mut self) -> io::Result<()> {
        let placeholder = Codec::Plain(Scanner::new(self.format));
        let Codec::SniffDeflate(head, scanner) = std::mem::replace(&mut self.codec, placeholder) else {
            return Ok(());
        };
        // Servers disagree on what "deflate" means; a zlib header is unambiguous.
        let zlib = match head.as_slice() {
            [cmf, flg, ..] => cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
            _ => false,
        };
        if zlib {
            let mut d = ZlibDecoder::new(Sink(scanner));
            let r = write_flush(&mut d, &head);
            self.codec = Codec::Zlib(d);
            r
        } else {
            let mut d = DeflateDecoder::new(Sink(scanner));
            let r = write_flush(&mut d, &head);
            self.codec = Codec::Deflate(d);
            r
        }
    }
}

/// Writes and flushes, so every byte decoded so far has reached the scanner.
fn write_flush<W: Write>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::super::scan::fixtures;
    use super::*;
    use flate2::Compression;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use proptest::prelude::*;

    /// `brotli -q 11` of the stream-sse-crlf.txt fixture.
    const SSE_CRLF_BR: &[u8] = &[
        0xc1, 0x50, 0x46, 0x00, 0xe0, 0x28, 0x70, 0x63, 0x79, 0x3e, 0x29, 0x5a, 0xc6, 0xe8, 0xe8, 0x90, 0x9e, 0x1d,
        0xbf, 0x3f, 0x53, 0xbf, 0xfc, 0xe4, 0xfe, 0xc5, 0xad, 0x2d, 0x41, 0x4c, 0x11, 0x10, 0xac, 0x66, 0xe9, 0xeb,
        0xd2, 0xe9, 0x7f, 0x9d, 0x26, 0x1a, 0x86, 0x45, 0xd9, 0xf7, 0x53, 0x1b, 0x95, 0x6e, 0x59, 0x4e, 0xa5, 0xe4,
        0x2a, 0xc8, 0x8d, 0x1f, 0x1e, 0x9f, 0x00, 0x2d, 0xf8, 0x9a, 0x5b, 0x9b, 0x82, 0x52, 0xd0, 0x2b, 0x70, 0xe9,
        0xe9, 0x4d, 0x30, 0x8a, 0x05, 0xe1, 0xf4, 0x2b, 0xf4, 0x05, 0x9e, 0x66, 0xb0, 0x46, 0x5f, 0x1a, 0x2e, 0x94,
        0x03, 0x80, 0x51, 0x84, 0x3a, 0xf8, 0x56, 0xc2, 0x70, 0xe5, 0x22, 0x6a, 0xf2, 0x3f, 0x63, 0x82, 0x40, 0x18,
        0x46, 0x08, 0x9c, 0xfc, 0x70, 0x99, 0x06, 0xf5, 0x7c, 0xa8, 0xe6, 0xb7, 0x71, 0x83, 0x7a, 0xad, 0xe2, 0x72,
        0xdc, 0x9f, 0x6e, 0xaf, 0x71, 0x91, 0xe9, 0xf0, 0xf4, 0xcb, 0x05, 0x53, 0x08, 0xca, 0x55, 0xa1, 0xf4, 0x48,
        0xd7, 0x6f, 0x5c, 0xa5, 0x19, 0xc6, 0xcf, 0xd5, 0x05, 0x57, 0xaf, 0x46, 0x04, 0x17, 0x78, 0xc4, 0x78, 0xb7,
        0xbe, 0xbd, 0x21, 0xff, 0x1b, 0x3d, 0x04, 0x6e, 0x8d, 0x02, 0xa1, 0x61, 0xc9, 0x37, 0x82, 0x90, 0xce, 0x21,
        0x9c, 0x07, 0x33, 0x0e, 0x2e, 0x2a, 0x34, 0xc9, 0x8c, 0xf4, 0xf2, 0xd6, 0x35, 0xc6, 0x58, 0x9e, 0x21, 0x33,
        0x2c, 0x82, 0xe7, 0x02, 0x96, 0xf3, 0x19, 0x2d, 0xb0, 0x20, 0x1a, 0xd3, 0xdf, 0x00, 0xcc, 0xa7, 0xd9, 0x4c,
        0xe9, 0xb8, 0x78, 0x61, 0xdb, 0xed, 0x85, 0xe6, 0xe2, 0x3b, 0xe8, 0x23, 0x33, 0xa7, 0x07, 0xd3, 0xf2, 0xef,
        0x1f, 0x08, 0x9e, 0x54, 0x9b, 0x4b, 0xa1, 0x6f, 0x1f, 0xcb, 0x9f, 0x19, 0x24, 0x53, 0x6d, 0x21, 0x44, 0xff,
        0xca, 0x8b, 0xb1, 0xb6, 0x90, 0x3f, 0x32, 0x28, 0xae, 0xda, 0x52, 0x8a, 0x71, 0x7b, 0x0f, 0xaf, 0xba, 0xcf,
        0xc4, 0x1c, 0x59, 0x7a, 0xe9, 0x6e, 0x02, 0xa1, 0x87, 0x1f, 0x89, 0x2c, 0x01, 0xb3, 0x0c, 0x5a, 0x28, 0x9b,
        0x52, 0x02,
    ];
    /// `brotli -q 11` of the stream-json-array.txt fixture.
    const JSON_ARRAY_BR: &[u8] = &[
        0xc1, 0x40, 0x68, 0x00, 0x63, 0x55, 0xbc, 0x43, 0x28, 0x1c, 0x6a, 0x61, 0x76, 0xd1, 0x89, 0x3f, 0x44, 0x4c,
        0xce, 0xcf, 0x39, 0xc5, 0xd9, 0xf0, 0xc8, 0x27, 0x18, 0xd0, 0x7d, 0x6d, 0x8d, 0xb8, 0xf5, 0x96, 0xfa, 0xb3,
        0x2b, 0x5d, 0x10, 0x6c, 0xaa, 0xf0, 0xed, 0x87, 0xcd, 0xc7, 0x78, 0x20, 0x15, 0x40, 0xfa, 0x5a, 0x04, 0xa4,
        0xab, 0x6f, 0xe8, 0xb4, 0x42, 0x03, 0xcb, 0xde, 0xbf, 0xee, 0xdb, 0x7c, 0xa0, 0xc6, 0x23, 0x4b, 0x78, 0x29,
        0xb3, 0x77, 0x77, 0x5c, 0x07, 0x36, 0x51, 0x16, 0xf5, 0x3e, 0xfd, 0x89, 0x23, 0x48, 0x00, 0x77, 0x96, 0xc3,
        0x05, 0x85, 0x06, 0xf5, 0x6c, 0xbd, 0xf9, 0x0b, 0xc0, 0x2f, 0x7b, 0x45, 0x89, 0x9e, 0xa1, 0x55, 0x85, 0x70,
        0xaf, 0x82, 0x71, 0x09, 0x70, 0xdb, 0x22, 0xcc, 0xa2, 0xb6, 0x4a, 0xc4, 0xf0, 0x20, 0x5b, 0x70, 0x6c, 0x2b,
        0xf7, 0xaa, 0xa4, 0xaa, 0x8e, 0xe1, 0x01, 0xcb, 0xed, 0xe8, 0x90, 0x58, 0x24, 0x44, 0x02, 0x51, 0xfc, 0x83,
        0xe3, 0xe8, 0x12, 0x3a, 0x1c, 0x0b, 0x1c, 0x3a, 0x88, 0x74, 0x97, 0xbc, 0x5e, 0xa2, 0x18, 0x89, 0xca, 0x78,
        0xfa, 0x68, 0x9f, 0xa5, 0xdb, 0x72, 0x8a, 0x91, 0xee, 0x84, 0xdf, 0x95, 0x42, 0xe8, 0x73, 0x82, 0xf6, 0x58,
        0xfa, 0xff, 0x41, 0xf2, 0x5c, 0x42, 0xb8, 0x7e, 0x41, 0x4f, 0x75, 0xff, 0xd6, 0xa3, 0xa4, 0xb2, 0xe1, 0x65,
        0xa2, 0x91, 0x2e, 0xa6, 0x39, 0xec, 0xe3, 0xe4, 0xeb, 0xbe, 0x8a, 0xf6, 0xad, 0xf1, 0x4c, 0xff, 0x55, 0xf2,
        0xd2, 0x67, 0xca, 0x4a, 0x78, 0xb9, 0xf7, 0xcc, 0x4d, 0x9a, 0xb2, 0xcf, 0x9a, 0xc4, 0x61, 0x22, 0x5b, 0xc0,
        0x9d, 0xf1, 0x70, 0xb7, 0x09, 0x80, 0x3e, 0x85, 0x62, 0xb5, 0x13, 0x2d, 0x0e, 0xff, 0x4d, 0x35, 0xb1, 0xa2,
        0x6e, 0x28, 0xdf, 0xa8, 0x9f, 0xbb, 0x80, 0x4d, 0x75, 0xf3, 0x24, 0xf0, 0xf5, 0x6f, 0xd7, 0x87, 0x2f, 0xa9,
        0x38, 0x2e, 0x7a, 0x92, 0x8c, 0x39, 0x25, 0xcc, 0xa7, 0xef, 0xf9, 0xa9, 0x78, 0x66, 0x40, 0x7a, 0xa1, 0x36,
        0xad, 0xd3, 0x77, 0x85, 0x1a, 0x19, 0x50, 0x5a, 0xb8, 0x55, 0x22, 0xf1, 0x0b, 0xa7, 0x6f, 0x0b, 0x0d, 0x7f,
        0x81, 0xb6, 0x2b, 0x25, 0x9a, 0x0d, 0x6b, 0xb7, 0x8e, 0x64, 0x37, 0x28, 0x0e, 0x34, 0x71, 0x05, 0x9f, 0x48,
        0x12, 0xa7, 0x00, 0x3a, 0x56, 0x5d, 0x1b, 0xda, 0xca, 0x1c, 0xc9, 0xd2, 0x29,
    ];

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).expect("compress");
        e.finish().expect("compress")
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).expect("compress");
        e.finish().expect("compress")
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).expect("compress");
        e.finish().expect("compress")
    }

    fn plain(format: Format, body: &[u8]) -> ScanSummary {
        let mut s = Scanner::new(format);
        s.feed(body);
        s.summary()
    }

    fn decoded(enc: Option<&str>, format: Format, pieces: &[&[u8]]) -> ScanSummary {
        let mut d = DecodingScanner::new(enc, format);
        for p in pieces {
            d.feed(p);
        }
        d.summary()
    }

    /// Whole, split at every offset and byte by byte, the usage must match the plain scan.
    fn check_all_splits(enc: &str, format: Format, compressed: &[u8], want: &ScanSummary) {
        assert_eq!(&decoded(Some(enc), format, &[compressed]), want, "{enc} whole");
        for cut in 0..=compressed.len() {
            let (a, b) = compressed.split_at(cut);
            assert_eq!(&decoded(Some(enc), format, &[a, b]), want, "{enc} cut {cut}");
        }
        let bytes: Vec<&[u8]> = compressed.chunks(1).collect();
        assert_eq!(&decoded(Some(enc), format, &bytes), want, "{enc} bytewise");
    }

    #[test]
    fn gzip_fixtures_every_offset() {
        for &(name, format, body) in fixtures::ALL {
            let want = plain(format, body);
            assert!(want.usage_seen || want.error.is_some(), "{name}");
            check_all_splits("gzip", format, &gzip(body), &want);
        }
    }

    #[test]
    fn brotli_fixtures_every_offset() {
        let cases = [
            (SSE_CRLF_BR, Format::Sse, fixtures::SSE_CRLF),
            (JSON_ARRAY_BR, Format::JsonArray, fixtures::JSON_ARRAY),
        ];
        for (compressed, format, body) in cases {
            let want = plain(format, body);
            assert_eq!(want.usage.total, Some(1644));
            check_all_splits("br", format, compressed, &want);
        }
    }

    #[test]
    fn deflate_zlib_and_raw() {
        let body = fixtures::SSE_CRLF;
        let want = plain(Format::Sse, body);
        check_all_splits("deflate", Format::Sse, &zlib(body), &want);
        check_all_splits("Deflate", Format::Sse, &raw_deflate(body), &want);
    }

    #[test]
    fn multi_member_gzip() {
        let half = fixtures::SSE_CRLF.len() / 2;
        // Cut inside an event: members need not align with events.
        let (a, b) = fixtures::SSE_CRLF.split_at(half);
        let mut two = gzip(a);
        two.extend_from_slice(&gzip(b));
        let want = plain(Format::Sse, fixtures::SSE_CRLF);
        check_all_splits("x-gzip", Format::Sse, &two, &want);
    }

    #[test]
    fn identity_and_unknown_pass_through() {
        let want = plain(Format::Sse, fixtures::SSE_CRLF);
        for enc in [None, Some("identity"), Some("none"), Some("zstd"), Some("")] {
            assert_eq!(decoded(enc, Format::Sse, &[fixtures::SSE_CRLF]), want, "{enc:?}");
        }
    }

    #[test]
    fn decoding_scanner_is_send() {
        fn send<T: Send>() {}
        send::<DecodingScanner>();
    }

    #[test]
    fn corrupt_stream_keeps_what_was_decoded() {
        let mut gz = gzip(fixtures::SSE_CRLF);
        let n = gz.len();
        // Break the CRC trailer and append garbage: all events were decoded already.
        if let Some(b) = gz.get_mut(n - 6) {
            *b ^= 0xff;
        }
        gz.extend_from_slice(b"garbage");
        let s = decoded(Some("gzip"), Format::Sse, &[&gz]);
        assert_eq!(s.usage.total, Some(1644));

        let mut br = SSE_CRLF_BR.to_vec();
        br.truncate(br.len() / 2);
        br.extend_from_slice(&[0xff; 64]);
        let _ = decoded(Some("br"), Format::Sse, &[&br]);
        let _ = decoded(Some("gzip"), Format::Sse, &[b"\x1f\x8b\x08\xff\xff\xff"]);
        let _ = decoded(Some("deflate"), Format::Sse, &[b"x", b"\x9c\xff\xff\xff"]);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(
            enc in prop::sample::select(vec!["gzip", "deflate", "br", "identity"]),
            body in prop::collection::vec(any::<u8>(), 0..2048),
            cut in any::<usize>(),
        ) {
            let cut = cut % (body.len() + 1);
            let (a, b) = body.split_at(cut);
            let _ = decoded(Some(enc), Format::Sse, &[a, b]);
        }

        #[test]
        fn gzip_random_pieces(cuts in prop::collection::vec(any::<usize>(), 0..20)) {
            let gz = gzip(fixtures::JSON_ARRAY);
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (gz.len() + 1)).collect();
            points.sort_unstable();
            let mut d = DecodingScanner::new(Some("gzip"), Format::JsonArray);
            let mut last = 0;
            for p in points {
                d.feed(&gz[last..p]);
                last = p;
            }
            d.feed(&gz[last..]);
            prop_assert_eq!(d.summary(), plain(Format::JsonArray, fixtures::JSON_ARRAY));
        }
    }
}

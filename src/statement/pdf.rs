//! The statement as a PDF (A4), drawn with krilla in DejaVu Sans Mono, which krilla subsets
//! and embeds with a ToUnicode map: the text is selectable and extractable (`pdftotext`).
//!
//! A monospaced face lets the tables be laid out in character columns (krilla draws text but
//! does not measure it). The layout is done first, into pages of positioned lines, then drawn.

use krilla::Document;
use krilla::color::{luma, rgb};
use krilla::geom::{PathBuilder, Point, Rect};
use krilla::metadata::Metadata;
use krilla::num::NormalizedF32;
use krilla::page::PageSettings;
use krilla::paint::Fill;
use krilla::text::{Font, TextDirection};

use super::{Statement, StatementError, cost};
use crate::clock::rfc3339;
use crate::ledger::Totals;

/// DejaVu Sans Mono (Bitstream Vera license, see `assets/fonts/LICENSE-DejaVu.txt`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
/// Advance of every glyph of the face, in em (1233 / 2048 units).
const ADVANCE_EM: f32 = 0.602;

const PAGE_W: f32 = 595.28;
const PAGE_H: f32 = 841.89;
const MARGIN: f32 = 48.0;
const BODY: f32 = 8.5;
const LINE: f32 = 12.0;
/// Characters per line at the body size.
const COLS: usize = ((PAGE_W - 2.0 * MARGIN) / (BODY * ADVANCE_EM)) as usize;

/// One thing drawn on a page.
#[derive(Debug)]
enum Item {
    /// Text with its baseline's left end at (x, y), y from the top.
    Text {
        x: f32,
        y: f32,
        size: f32,
        text: String,
        grey: bool,
    },
    /// A horizontal rule at y.
    Rule { y: f32 },
}

/// Lays out lines top to bottom, starting a page when one is full.
struct Layout {
    pages: Vec<Vec<Item>>,
    y: f32,
}

impl Layout {
    fn new() -> Self {
        Layout {
            pages: vec![Vec::new()],
            y: MARGIN,
        }
    }

    fn page(&mut self) -> &mut Vec<Item> {
        if self.pages.is_empty() {
            self.pages.push(Vec::new());
        }
        let last = self.pages.len() - 1;
        &mut self.pages[last]
    }

    /// Whether `h` more points fit on this page.
    fn fits(&self, h: f32) -> bool {
        self.y + h <= PAGE_H - MARGIN - 2.0 * LINE
    }

    /// Makes room for `h` points, on a new page if this one has not that much left.
    fn room(&mut self, h: f32) {
        if !self.fits(h) {
            self.pages.push(Vec::new());
            self.y = MARGIN;
        }
    }

    fn text(&mut self, size: f32, text: String, grey: bool) {
        let h = size * 1.4;
        self.room(h);
        self.y += h;
        let y = self.y;
        self.page().push(Item::Text {
            x: MARGIN,
            y,
            size,
            text,
            grey,
        });
    }

    fn line(&mut self, text: String) {
        self.text(BODY, text, false);
    }

    fn rule(&mut self) {
        self.room(4.0);
        self.y += 3.0;
        let y = self.y;
        self.page().push(Item::Rule { y });
        self.y += 1.0;
    }

    fn gap(&mut self) {
        self.y += LINE * 0.8;
    }

    /// A table: a heading, a header row, a rule, the rows. Keeps the heading with at least
    /// two rows.
    fn table(&mut self, title: &str, header: &str, rows: &[String]) {
        self.room(2.0 * 14.0 * 1.4 + 3.0 * LINE);
        self.text(11.0, title.to_string(), false);
        self.line(header.to_string());
        self.rule();
        if rows.is_empty() {
            self.text(BODY, "(no usage)".into(), true);
        }
        for r in rows {
            // A table that goes on over a page break repeats its header row.
            if !self.fits(BODY * 1.4) {
                self.room(BODY * 1.4);
                self.line(header.to_string());
                self.rule();
            }
            self.line(r.clone());
        }
        self.gap();
    }
}

/// Fits `s` into `w` characters: control characters shown as `?`, longer text cut with `…`.
fn fit(s: &str, w: usize) -> String {
    let clean: String = s.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    if clean.chars().count() <= w {
        return clean;
    }
    let mut out: String = clean.chars().take(w.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Name column width of the amount tables (with the amounts' 59, within [`COLS`]).
const NAME_W: usize = 37;

/// `name` then the amounts, right-aligned in fixed columns (numbers are never cut: a wider
/// one pushes the line to the right).
fn amounts_row(name: &str, t: &Totals) -> String {
    format!(
        "{:<NAME_W$} {:>8} {:>9} {:>11} {:>12} {:>14}",
        name,
        t.records,
        t.messages,
        t.tokens,
        t.bytes,
        cost(t)
    )
}

/// The lines of one row: a name longer than its column goes on a line of its own (whole, up
/// to the line's width), the amounts on the next.
fn amounts_rows(name: &str, t: &Totals, out: &mut Vec<String>) {
    let name = fit(name, COLS);
    if name.chars().count() <= NAME_W {
        out.push(amounts_row(&name, t));
    } else {
        out.push(name);
        out.push(amounts_row("", t));
    }
}

fn amounts_header(first: &str) -> String {
    format!(
        "{:<NAME_W$} {:>8} {:>9} {:>11} {:>12} {:>14}",
        first, "Records", "Messages", "Tokens", "Bytes", "Cost"
    )
}

/// The rows of a table of named totals.
fn table_rows<'a>(rows: impl Iterator<Item = (String, &'a Totals)>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, t) in rows {
        amounts_rows(&name, t, &mut out);
    }
    out
}

/// Lays the statement out into pages.
fn layout(s: &Statement) -> Vec<Vec<Item>> {
    let mut l = Layout::new();
    l.text(16.0, "Usage statement".into(), false);
    l.text(9.0, format!("gemini-meter · {}", s.month), true);
    l.gap();
    let summary = [
        ("User", s.user_id.clone()),
        ("Tier", s.tier.clone()),
        ("Period", format!("{} (UTC)", s.period())),
        ("Records", s.total.records.to_string()),
        ("Messages", s.total.messages.to_string()),
        ("Tokens", s.total.tokens.to_string()),
        ("Bytes", s.total.bytes.to_string()),
        ("Total cost", cost(&s.total)),
        ("Generated", rfc3339(s.generated_at)),
    ];
    for (k, v) in summary {
        l.line(format!("{k:<12}{}", fit(&v, COLS.saturating_sub(12))));
    }
    l.gap();

    let rows = table_rows(s.by_type.iter().map(|(k, t)| (k.clone(), t)));
    l.table("By type", &amounts_header("Type"), &rows);

    let rows = table_rows(
        s.by_model
            .iter()
            .map(|(m, t)| (m.clone().unwrap_or_else(|| "(no model: uploads)".into()), t)),
    );
    l.table("By model", &amounts_header("Model"), &rows);

    let rows = table_rows(s.by_rule.iter().map(|(r, t)| (r.label(), t)));
    l.table(
        "Cost by price rule",
        &amounts_header("Rule (type, model, price)"),
        &rows,
    );

    let rows = table_rows(s.daily.iter().map(|(d, t)| (d.clone(), t)));
    l.table("Daily", &amounts_header("Day (UTC)"), &rows);

    l.line(amounts_row("Total", &s.total));
    l.pages
}

/// Renders the statement as PDF bytes.
pub fn render_pdf(s: &Statement) -> Result<Vec<u8>, StatementError> {
    let font =
        Font::new(krilla::Data::from(FONT), 0).ok_or_else(|| StatementError::Pdf("the font does not parse".into()))?;
    let pages = layout(s);
    let n = pages.len();
    let mut doc = Document::new();
    doc.set_metadata(
        Metadata::new()
            .title(format!("Usage statement {} {}", s.user_id, s.month))
            .creator("gemini-meter".into())
            .language("en".into()),
    );
    let black = Fill::default();
    let grey = Fill {
        paint: rgb::Color::new(100, 100, 100).into(),
        opacity: NormalizedF32::ONE,
        rule: Default::default(),
    };
    let rule_fill = Fill {
        paint: luma::Color::new(170).into(),
        opacity: NormalizedF32::ONE,
        rule: Default::default(),
    };
    let settings = PageSettings::from_wh(PAGE_W, PAGE_H).ok_or_else(|| StatementError::Pdf("page size".into()))?;
    for (i, items) in pages.into_iter().enumerate() {
        let mut page = doc.start_page_with(settings.clone());
        let mut surface = page.surface();
        for item in items {
            match item {
                Item::Text {
                    x,
                    y,
                    size,
                    text,
                    grey: g,
                } => {
                    surface.set_fill(Some(if g { grey.clone() } else { black.clone() }));
                    surface.draw_text(
                        Point::from_xy(x, y),
                        font.clone(),
                        size,
                        &text,
                        false,
                        TextDirection::Auto,
                    );
                }
                Item::Rule { y } => {
                    if let Some(rect) = Rect::from_xywh(MARGIN, y, PAGE_W - 2.0 * MARGIN, 0.6) {
                        let mut pb = PathBuilder::new();
                        pb.push_rect(rect);
                        if let Some(path) = pb.finish() {
                            surface.set_fill(Some(rule_fill.clone()));
                            surface.draw_path(&path);
                        }
                    }
                }
            }
        }
        let footer = format!(
            "Statement {} {} · page {} of {}",
            fit(&s.user_id, 64),
            s.month,
            i + 1,
            n
        );
        surface.set_fill(Some(grey.clone()));
        surface.draw_text(
            Point::from_xy(MARGIN, PAGE_H - MARGIN + 8.0),
            font.clone(),
            7.5,
            &footer,
            false,
            TextDirection::Auto,
        );
        surface.finish();
        page.finish();
    }
    doc.finish().map_err(|e| StatementError::Pdf(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Month;

    #[test]
    fn a_table_over_a_page_break_repeats_its_header() {
        let t = Totals {
            records: 1,
            ..Default::default()
        };
        let s = Statement {
            user_id: "u".into(),
            tier: "free".into(),
            month: Month(202611),
            generated_at: Month(202612).start(),
            total: t,
            by_type: vec![],
            by_model: (0..120).map(|i| (Some(format!("model-{i:03}")), t)).collect(),
            by_rule: vec![],
            daily: vec![],
        };
        let pages = layout(&s);
        assert!(pages.len() >= 3, "{} pages", pages.len());
        for page in &pages[1..] {
            let Some(Item::Text { text, .. }) = page.first() else {
                panic!("a page starts with text");
            };
            assert!(text.starts_with("Model") || !text.starts_with("model-"), "{text}");
        }
        let second = &pages[1];
        assert!(matches!(second.first(), Some(Item::Text { text, .. }) if text.starts_with("Model ")));
        assert!(render_pdf(&s).unwrap().starts_with(b"%PDF-"));
    }
}

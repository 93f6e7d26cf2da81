//! Tables and `name  value` lists for people; the `--json` output is the gateway's own JSON.

use serde_json::Value;

/// A JSON value as a table cell: strings bare, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Left-aligned columns two spaces apart, with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(c);
            let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(c.chars().count());
            l.extend(std::iter::repeat_n(' ', pad));
        }
        s.push_str(l.trim_end());
        s.push('\n');
    };
    line(&mut headers.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    s
}

/// `name  value` lines.
pub fn pairs(items: &[(&str, String)]) -> String {
    let w = items.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    items.iter().map(|(k, v)| format!("{k:<w$}  {v}\n")).collect()
}

/// `users list`.
pub fn users(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|u| {
                    vec![
                        cell(&u["id"]),
                        cell(&u["tier"]),
                        cell(&u["email"]),
                        cell(&u["created_at"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["ID", "TIER", "EMAIL", "CREATED"], &rows)
}

/// One user.
pub fn user(v: &Value) -> String {
    pairs(&[
        ("id", cell(&v["id"])),
        ("tier", cell(&v["tier"])),
        ("email", cell(&v["email"])),
        ("created_at", cell(&v["created_at"])),
    ])
}

/// This month against the limits (the `current` body).
pub fn current(v: &Value) -> String {
    let used = &v["current_month"];
    let rows: Vec<Vec<String>> = ["messages", "tokens", "bytes", "cost"]
        .iter()
        .map(|q| {
            let pct = match &v["percentage"][q] {
                Value::Null => "-".to_string(),
                p => format!("{}%", cell(p)),
            };
            vec![
                q.to_string(),
                cell(&used[q]),
                cell(&v["reserved"][q]),
                cell(&v["limits"][q]),
                pct,
            ]
        })
        .collect();
    let mut s = format!(
        "{} (tier {}), {}; resets at {}\n",
        cell(&v["user_id"]),
        cell(&v["tier"]),
        cell(&v["month"]),
        cell(&v["resets_at"])
    );
    s.push_str(&table(&["QUOTA", "USED", "IN FLIGHT", "LIMIT", "USED %"], &rows));
    s
}

/// A user's totals for a month.
pub fn month_totals(v: &Value) -> String {
    let mut s = format!(
        "{} (tier {}), {}\n",
        cell(&v["user_id"]),
        cell(&v["tier"]),
        cell(&v["month"])
    );
    s.push_str(&table(
        &["MESSAGES", "TOKENS", "BYTES", "COST", "RECORDS"],
        &[vec![
            cell(&v["messages"]),
            cell(&v["tokens"]),
            cell(&v["bytes"]),
            cell(&v["cost"]),
            cell(&v["records"]),
        ]],
    ));
    s
}

/// `keys list`.
pub fn keys(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|k| {
                    vec![
                        cell(&k["key_id"]),
                        format!("{}…", cell(&k["prefix"])),
                        cell(&k["created_at"]),
                        cell(&k["revoked_at"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["KEY_ID", "PREFIX", "CREATED", "REVOKED"], &rows)
}

/// `reload` and `status`.
pub fn status(v: &Value) -> String {
    let mut items = vec![
        ("config loaded_at", cell(&v["loaded_at"])),
        ("config last_error", cell(&v["last_error"])),
    ];
    if v["tls"].is_object() {
        items.push(("tls loaded_at", cell(&v["tls"]["loaded_at"])));
        items.push(("tls last_error", cell(&v["tls"]["last_error"])));
    }
    pairs(&items)
}

/// `cluster`: this replica's view of the engines, then one row per live replica.
pub fn cluster(v: &Value) -> String {
    let mut s = pairs(&[
        ("replica", cell(&v["replica"])),
        ("redis", cell(&v["redis"]["status"])),
        ("postgres", cell(&v["postgres"]["status"])),
        ("shipping backlog", cell(&v["shipping_backlog"])),
        ("config hashes differ", cell(&v["config_hashes_differ"])),
    ]);
    let rows: Vec<Vec<String>> = v["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let hash = r["config_hash"].as_str().unwrap_or("-");
                    vec![
                        cell(&r["replica"]),
                        cell(&r["version"]),
                        hash.get(..12).unwrap_or(hash).to_string(),
                        cell(&r["shipping_backlog"]),
                        cell(&r["redis"]),
                        cell(&r["postgres"]),
                        cell(&r["seen_at"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    s.push('\n');
    s.push_str(&table(
        &["REPLICA", "VERSION", "CONFIG", "BACKLOG", "REDIS", "POSTGRES", "SEEN"],
        &rows,
    ));
    s
}

/// `audit`.
pub fn audit(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let detail = match &e["detail"] {
                        Value::Object(m) if m.is_empty() => "-".to_string(),
                        d => d.to_string(),
                    };
                    vec![
                        cell(&e["at"]),
                        cell(&e["action"]),
                        cell(&e["target"]),
                        cell(&e["caller"]),
                        cell(&e["outcome"]),
                        cell(&e["status"]),
                        detail,
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &["AT", "ACTION", "TARGET", "CALLER", "OUTCOME", "STATUS", "DETAIL"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let t = table(&["A", "LONGER"], &[vec!["wide value".into(), "x".into()]]);
        assert_eq!(t, "A           LONGER\nwide value  x\n");
    }
}

//! Human-readable output: aligned tables and transaction results.

use raftkv_client::pb;

pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }

    pub fn print(&self) {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{:<w$}", c, w = widths.get(i).copied().unwrap_or(0)))
                .collect();
            println!("{}", parts.join("  ").trim_end());
        };
        line(&self.header);
        for r in &self.rows {
            line(r);
        }
    }
}

pub fn bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", n / 1024.0 / 1024.0 / 1024.0)
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n} B")
    }
}

pub fn print_txn_responses(responses: &[pb::ResponseOp]) {
    use pb::response_op::Response as R;
    for r in responses {
        match &r.response {
            Some(R::ResponsePut(_)) => println!("put: OK"),
            Some(R::ResponseDeleteRange(d)) => println!("del: deleted {}", d.deleted),
            Some(R::ResponseRange(rr)) => {
                if rr.kvs.is_empty() {
                    println!("get: (none)");
                }
                for kv in &rr.kvs {
                    println!(
                        "get: {} = {}",
                        String::from_utf8_lossy(&kv.key),
                        String::from_utf8_lossy(&kv.value)
                    );
                }
            }
            Some(R::ResponseTxn(t)) => {
                println!("txn: {}", if t.succeeded { "SUCCESS" } else { "FAILURE" });
                print_txn_responses(&t.responses);
            }
            None => {}
        }
    }
}

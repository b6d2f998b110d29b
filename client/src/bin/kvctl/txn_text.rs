//! The readable text form of a transaction that `kvctl txn` takes:
//!
//! ```text
//! if
//!   value("config/mode") == "blue"
//!   version("config/lock") == 0
//! then
//!   put config/mode green
//!   put "key with spaces" "value with spaces"
//!   get config/
//!   get --prefix config/
//!   del config/old
//!   del --prefix tmp/
//! else
//!   get config/mode
//! ```
//!
//! Compare targets: `value`, `version`, `create`, `mod`, `lease`; operators `==`, `!=`, `>`,
//! `<`. Tokens with spaces or special characters are double-quoted, with `\"`, `\\`, `\n`, `\t`
//! and `\xNN` escapes. Blank lines and lines starting with `#` are ignored.

use raftkv_client::txn::Cmp;
use raftkv_client::{Compare, Op, Txn};

#[derive(Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "txn line {}: {}", self.line, self.message)
    }
}

fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: message.into(),
    }
}

/// Splits a line into tokens, honouring double quotes and escapes.
fn tokens(line: &str, n: usize) -> Result<Vec<Vec<u8>>, ParseError> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut tok = Vec::new();
        if c == '"' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some('n') => tok.push(b'\n'),
                        Some('t') => tok.push(b'\t'),
                        Some('"') => tok.push(b'"'),
                        Some('\\') => tok.push(b'\\'),
                        Some('x') => {
                            let hex: String = chars.by_ref().take(2).collect();
                            let b = u8::from_str_radix(&hex, 16)
                                .map_err(|_| err(n, format!("bad escape \\x{hex}")))?;
                            tok.push(b);
                        }
                        Some(other) => return Err(err(n, format!("unknown escape \\{other}"))),
                        None => return Err(err(n, "line ends inside an escape")),
                    },
                    c => {
                        let mut buf = [0u8; 4];
                        tok.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            if !closed {
                return Err(err(n, "unterminated quoted string"));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                let mut buf = [0u8; 4];
                tok.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                chars.next();
            }
        }
        out.push(tok);
    }
    Ok(out)
}

fn parse_compare(line: &str, n: usize) -> Result<Compare, ParseError> {
    let open = line.find('(').ok_or_else(|| {
        err(
            n,
            format!("expected target(\"key\") OP operand, got {line:?}"),
        )
    })?;
    let close = line
        .rfind(')')
        .ok_or_else(|| err(n, "missing ')' after the compare key"))?;
    if close < open {
        return Err(err(n, "')' before '('"));
    }
    let target = line[..open].trim().to_ascii_lowercase();
    let key_toks = tokens(&line[open + 1..close], n)?;
    let [key] = key_toks.as_slice() else {
        return Err(err(
            n,
            "the compare needs exactly one key inside the parentheses",
        ));
    };
    let rest = line[close + 1..].trim();
    let (op, operand) = ["==", "!=", ">", "<", "="]
        .iter()
        .find_map(|op| rest.strip_prefix(op).map(|r| (*op, r.trim())))
        .ok_or_else(|| {
            err(
                n,
                format!("expected one of == != > < after the key, got {rest:?}"),
            )
        })?;
    let cmp = match op {
        "==" | "=" => Cmp::Equal,
        "!=" => Cmp::NotEqual,
        ">" => Cmp::Greater,
        _ => Cmp::Less,
    };
    let operand_toks = tokens(operand, n)?;
    let [operand] = operand_toks.as_slice() else {
        return Err(err(n, "the compare needs exactly one operand"));
    };
    let number = || -> Result<i64, ParseError> {
        String::from_utf8_lossy(operand).parse().map_err(|_| {
            err(
                n,
                format!(
                    "{target} compares against a number, got {:?}",
                    String::from_utf8_lossy(operand)
                ),
            )
        })
    };
    Ok(match target.as_str() {
        "value" => Compare::value(key.clone(), cmp, operand.clone()),
        "version" | "ver" => Compare::version(key.clone(), cmp, number()?),
        "create" | "create_revision" | "c" => Compare::create_revision(key.clone(), cmp, number()?),
        "mod" | "mod_revision" | "m" => Compare::mod_revision(key.clone(), cmp, number()?),
        "lease" => Compare::lease(key.clone(), cmp, number()?),
        other => {
            return Err(err(
                n,
                format!(
                    "unknown compare target {other:?} (expected value, version, create, mod or lease)"
                ),
            ));
        }
    })
}

fn parse_op(line: &str, n: usize) -> Result<Op, ParseError> {
    let toks = tokens(line, n)?;
    let words: Vec<&[u8]> = toks.iter().map(|t| t.as_slice()).collect();
    match words.as_slice() {
        [b"put", key, value] => Ok(Op::put(key.to_vec(), value.to_vec())),
        [b"get", key] => Ok(Op::get(key.to_vec())),
        [b"get", b"--prefix", key] => Ok(Op::get_prefix(key.to_vec())),
        [b"del", key] | [b"delete", key] => Ok(Op::delete(key.to_vec())),
        [b"del", b"--prefix", key] | [b"delete", b"--prefix", key] => {
            Ok(Op::delete_prefix(key.to_vec()))
        }
        [b"put", ..] => Err(err(n, "put takes a key and a value")),
        [b"get", ..] => Err(err(n, "get takes a key (optionally --prefix KEY)")),
        [b"del", ..] | [b"delete", ..] => Err(err(n, "del takes a key (optionally --prefix KEY)")),
        _ => Err(err(
            n,
            format!("unknown operation {line:?} (expected put, get or del)"),
        )),
    }
}

/// Parses the text form of a transaction.
pub fn parse(text: &str) -> Result<Txn, ParseError> {
    #[derive(PartialEq)]
    enum Section {
        Start,
        If,
        Then,
        Else,
    }
    let mut section = Section::Start;
    let (mut compares, mut success, mut failure) = (Vec::new(), Vec::new(), Vec::new());
    let mut saw_then = false;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.to_ascii_lowercase().as_str() {
            "if" => {
                if section != Section::Start {
                    return Err(err(n, "'if' must come first, once"));
                }
                section = Section::If;
                continue;
            }
            "then" => {
                if section == Section::Then || section == Section::Else {
                    return Err(err(n, "'then' appears twice or after 'else'"));
                }
                section = Section::Then;
                saw_then = true;
                continue;
            }
            "else" => {
                if section != Section::Then {
                    return Err(err(n, "'else' must follow 'then'"));
                }
                section = Section::Else;
                continue;
            }
            _ => {}
        }
        match section {
            Section::Start => return Err(err(n, "a transaction starts with 'if' or 'then'")),
            Section::If => compares.push(parse_compare(line, n)?),
            Section::Then => success.push(parse_op(line, n)?),
            Section::Else => failure.push(parse_op(line, n)?),
        }
    }
    if !saw_then {
        return Err(err(text.lines().count().max(1), "missing 'then' section"));
    }
    Ok(Txn::new().when(compares).and_then(success).or_else(failure))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form() {
        let t = parse(
            r#"
            # swap the mode if nobody holds the lock
            if
              value("config/mode") == "blue"
              version("config/lock") = 0
            then
              put config/mode green
              put "key with spaces" "a \"quoted\" value"
              get --prefix config/
              del --prefix tmp/
            else
              get config/mode
            "#,
        )
        .unwrap()
        .into_request();
        assert_eq!(t.compare.len(), 2);
        assert_eq!(t.success.len(), 4);
        assert_eq!(t.failure.len(), 1);
    }

    #[test]
    fn reports_malformed_lines_with_their_number() {
        let e = parse("if\n  size(\"k\") == 1\nthen\n  put k v\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("unknown compare target"));
        assert_eq!(
            parse("if\nvalue(\"k\") == v\n").unwrap_err().message,
            "missing 'then' section"
        );
        assert!(
            parse("then\n  frobnicate k\n")
                .unwrap_err()
                .message
                .contains("unknown operation")
        );
        assert!(parse("then\n  put \"unterminated\n").is_err());
        assert!(
            parse("if\n version(\"k\") > lots\nthen\n")
                .unwrap_err()
                .message
                .contains("number")
        );
        assert!(parse("then\nput k v\n").is_ok());
    }
}

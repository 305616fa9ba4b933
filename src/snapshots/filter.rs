//! containerd's filter syntax, as used by List (`ctr snapshots ls`, the GC):
//!
//! ```text
//! filters   := filter*                      (a snapshot matches if any filter does)
//! filter    := selector ("," selector)*     (all selectors must match)
//! selector  := fieldpath (op value)?        (no op: the field must be present)
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! op        := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+
//! quoted    := "..." with Go escapes, or /.../ or |...| (for regexes)
//! ```
//!
//! Snapshot fields: `kind` (active, view, committed), `name`, `parent`,
//! `labels.<key>`.

use regex::Regex;

use super::{Info, Kind};
use crate::error::{Error, Result};

#[derive(Debug)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed set of filters: any of (all of selectors).
#[derive(Debug)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses containerd's repeated `filters` field. No filters match everything.
    pub fn parse_any(filters: &[String]) -> Result<Filter> {
        let any = filters
            .iter()
            .map(|f| {
                Parser { src: f, pos: 0 }
                    .parse()
                    .map_err(|msg| Error::InvalidArgument(format!("filter {f:?}: {msg}")))
            })
            .collect::<Result<_>>()?;
        Ok(Filter { any })
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.any.is_empty() || self.any.iter().any(|all| all.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field(info, &self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Eq(v) => value == Some(v.as_str()),
            // containerd compares an absent field as "".
            Op::Ne(v) => value.unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.unwrap_or("")),
        }
    }
}

fn field<'a>(info: &'a Info, path: &[String]) -> Option<&'a str> {
    match path.first().map(String::as_str)? {
        "kind" => Some(match info.kind {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }),
        "name" => Some(&info.name),
        "parent" => Some(&info.parent),
        "labels" => info.labels.get(&path[1..].join(".")).map(String::as_str),
        _ => None,
    }
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn parse(mut self) -> std::result::Result<Vec<Selector>, String> {
        let mut selectors = Vec::new();
        self.skip_ws();
        if self.peek().is_none() {
            return Ok(selectors);
        }
        loop {
            selectors.push(self.selector()?);
            self.skip_ws();
            match self.next() {
                None => return Ok(selectors),
                Some(',') => continue,
                Some(c) => return Err(format!("expected ',' at offset {}, found {c:?}", self.pos - 1)),
            }
        }
    }

    fn selector(&mut self) -> std::result::Result<Selector, String> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        self.skip_ws();
        let op = match (self.peek(), self.src[self.pos..].chars().nth(1)) {
            (Some(c @ ('=' | '!' | '~')), Some('=')) => {
                self.pos += 2;
                self.skip_ws();
                let value = self.value()?;
                match c {
                    '=' => Op::Eq(value),
                    '!' => Op::Ne(value),
                    _ => Op::Matches(Regex::new(&value).map_err(|e| format!("bad regular expression {value:?}: {e}"))?),
                }
            }
            (Some('=' | '!' | '~'), _) => return Err(format!("bad operator at offset {}", self.pos)),
            _ => Op::Present,
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> std::result::Result<String, String> {
        self.skip_ws();
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                Ok(self.take_while(|c| c.is_ascii_alphanumeric() || c == '_').to_string())
            }
            other => Err(format!("expected a field name at offset {}, found {other:?}", self.pos)),
        }
    }

    fn value(&mut self) -> std::result::Result<String, String> {
        match self.peek() {
            Some(q @ ('"' | '/' | '|')) => self.quoted(q),
            Some(_) => {
                let v = self.take_while(|c| c != ',' && !c.is_whitespace());
                if v.is_empty() {
                    Err(format!("expected a value at offset {}", self.pos))
                } else {
                    Ok(v.to_string())
                }
            }
            None => Err("expected a value at end of input".into()),
        }
    }

    /// Reads a quoted string starting at the opening quote, with Go's escapes.
    fn quoted(&mut self, quote: char) -> std::result::Result<String, String> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let c = self
                .next()
                .ok_or_else(|| format!("unterminated quote starting at offset {start}"))?;
            if c == quote {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let e = self
                .next()
                .ok_or_else(|| format!("unterminated escape at offset {}", self.pos))?;
            let simple = match e {
                'a' => Some('\x07'),
                'b' => Some('\x08'),
                'f' => Some('\x0c'),
                'n' => Some('\n'),
                'r' => Some('\r'),
                't' => Some('\t'),
                'v' => Some('\x0b'),
                '\\' => Some('\\'),
                c if c == quote => Some(c),
                _ => None,
            };
            if let Some(s) = simple {
                out.push(s);
                continue;
            }
            let (radix, digits) = match e {
                'x' => (16, 2),
                'u' => (16, 4),
                'U' => (16, 8),
                '0'..='7' => {
                    self.pos -= 1;
                    (8, 3)
                }
                // Regex quotes keep unknown escapes for the regex engine.
                c if quote != '"' => {
                    out.push('\\');
                    out.push(c);
                    continue;
                }
                c => return Err(format!("unknown escape \\{c} at offset {}", self.pos - 1)),
            };
            let end = self.pos + digits;
            let code = self
                .src
                .get(self.pos..end)
                .and_then(|d| u32::from_str_radix(d, radix).ok())
                .and_then(char::from_u32)
                .ok_or_else(|| format!("bad escape at offset {}", self.pos))?;
            self.pos = end;
            out.push(code);
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !f(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        &self.src[start..self.pos]
    }

    fn skip_ws(&mut self) {
        self.take_while(char::is_whitespace);
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn matches(filters: &[&str], i: &Info) -> bool {
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filter::parse_any(&f).unwrap().matches(i)
    }

    #[test]
    fn containerd_walk_cases() {
        let a = info(
            "a-wl",
            "p-wl",
            Kind::Active,
            &[("l", "2"), ("containerd.io/gc.root", "check-walk")],
        );
        let p = info("p", "", Kind::Committed, &[("containerd.io/gc.root", "check-walk")]);
        assert!(matches(&[r#"labels."containerd.io/gc.root"==check-walk"#], &a));
        assert!(matches(
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
            &a
        ));
        assert!(!matches(&["kind==view"], &a));
        assert!(matches(&["name==p", "name==a-wl"], &a));
        assert!(matches(&["name==a-wl,labels.l"], &a));
        assert!(!matches(&["labels.l"], &p));
        assert!(matches(&[r#"parent!="""#], &a));
        assert!(!matches(&[r#"parent!="""#], &p));
        assert!(matches(&["labels.l==2"], &a));
        assert!(matches(&["name~=/^a-.*$/"], &a));
        assert!(!matches(&["name~=|^p|"], &a));
        assert!(matches(&[], &a));
        assert!(matches(&[""], &a));
    }

    /// The filter containerd's metadata store sends after a remote snapshot
    /// answered ALREADY_EXISTS (parent quoted, possibly empty).
    #[test]
    fn remote_snapshot_lookup() {
        let chain = "sha256:0123abcd";
        let top = info("1/2/x", "", Kind::Committed, &[("containerd.io/snapshot.ref", chain)]);
        let child = info(
            "1/3/y",
            "1/2/x",
            Kind::Committed,
            &[("containerd.io/snapshot.ref", chain)],
        );
        let f = format!(r#"labels."containerd.io/snapshot.ref"=={chain},parent=="""#);
        assert!(matches(&[f.as_str()], &top));
        assert!(!matches(&[f.as_str()], &child));
        let f = format!(r#"labels."containerd.io/snapshot.ref"=={chain},parent=="1/2/x""#);
        assert!(matches(&[f.as_str()], &child));
        assert!(!matches(&[f.as_str()], &top));
    }

    #[test]
    fn errors_name_the_filter() {
        for bad in ["kind=", "kind==", "labels.\"x", "name==a b", "=="] {
            let err = Filter::parse_any(&[bad.to_string()]).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}

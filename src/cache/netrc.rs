//! netrc files (`machine HOST login USER password PASS`), for private caches
//! behind HTTP basic authentication, as Nix's `netrc-file` setting.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct Netrc {
    machines: HashMap<String, (String, String)>,
    default: Option<(String, String)>,
}

impl Netrc {
    pub fn load(path: &Path) -> std::io::Result<Netrc> {
        Ok(Netrc::parse(&std::fs::read_to_string(path)?))
    }

    pub fn parse(text: &str) -> Netrc {
        let mut n = Netrc::default();
        let mut tokens = text.split_whitespace();
        let mut current: Option<Option<String>> = None; // Some(Some(host)) | Some(None) = default
        let (mut login, mut password) = (String::new(), String::new());
        let flush = |cur: &Option<Option<String>>, login: &mut String, password: &mut String, n: &mut Netrc| {
            if let Some(host) = cur {
                let cred = (std::mem::take(login), std::mem::take(password));
                match host {
                    Some(h) => {
                        n.machines.insert(h.clone(), cred);
                    }
                    None => n.default = Some(cred),
                }
            }
        };
        while let Some(t) = tokens.next() {
            match t {
                "machine" => {
                    flush(&current, &mut login, &mut password, &mut n);
                    current = Some(tokens.next().map(str::to_string));
                }
                "default" => {
                    flush(&current, &mut login, &mut password, &mut n);
                    current = Some(None);
                }
                "login" => login = tokens.next().unwrap_or_default().to_string(),
                "password" => password = tokens.next().unwrap_or_default().to_string(),
                _ => {}
            }
        }
        flush(&current, &mut login, &mut password, &mut n);
        n
    }

    pub fn credentials(&self, host: &str) -> Option<&(String, String)> {
        self.machines.get(host).or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_machines_and_default() {
        let n = Netrc::parse("machine cache.example.org login alice password s3cret\nmachine other login bob password x\ndefault login anon password none\n");
        assert_eq!(
            n.credentials("cache.example.org"),
            Some(&("alice".into(), "s3cret".into()))
        );
        assert_eq!(n.credentials("other"), Some(&("bob".into(), "x".into())));
        assert_eq!(n.credentials("elsewhere"), Some(&("anon".into(), "none".into())));
        assert!(Netrc::parse("").credentials("x").is_none());
    }
}

//! `${env:NAME}` and `${env:NAME:-default}` substitution, done on the text before parsing.
//! `$$` stands for a literal `$`.

pub(crate) struct EnvError {
    pub line: u64,
    pub column: u64,
    pub message: String,
}

pub(crate) fn substitute(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, EnvError> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        // Comments are left alone: a `${env:...}` in a comment documents, it does not configure.
        let code_end = comment_start(line).unwrap_or(line.len());
        substitute_line(&line[..code_end], env, &mut out).map_err(|(offset, message)| {
            EnvError {
                line: i as u64 + 1,
                column: line[..offset].chars().count() as u64 + 1,
                message,
            }
        })?;
        out.push_str(&line[code_end..]);
    }
    Ok(out)
}

/// Where a YAML comment starts on `line`: a `#` at the start or after whitespace, outside quotes.
fn comment_start(line: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut prev_blank = true;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '#' && prev_blank => return Some(i),
            None if c == '"' || c == '\'' => quote = Some(c),
            None => {}
        }
        prev_blank = c == ' ' || c == '\t';
    }
    None
}

/// Substitutes within one line's code; an error carries its byte offset in the line.
fn substitute_line(
    line: &str,
    env: &dyn Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), (usize, String)> {
    let mut rest = line;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
            continue;
        }
        if !tail.starts_with("${") {
            out.push('$');
            rest = &tail[1..];
            continue;
        }
        let offset = line.len() - tail.len();
        let Some(close) = tail.find('}') else {
            return Err((offset, "unclosed `${`: expected `${env:NAME}` or `${env:NAME:-default}` (write `$$` for a literal `$`)".into()));
        };
        let inner = &tail[2..close];
        let Some(spec) = inner.strip_prefix("env:") else {
            return Err((
                offset,
                format!("unsupported substitution `${{{inner}}}`: expected `${{env:NAME}}` or `${{env:NAME:-default}}`"),
            ));
        };
        let (name, default) = match spec.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (spec, None),
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err((
                offset,
                format!("`{name}` is not a valid environment variable name"),
            ));
        }
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err((
                    offset,
                    format!("environment variable `{name}` is not set and has no default (write `${{env:{name}:-default}}` to give one)"),
                ))
            }
        }
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("9000".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes() {
        let s = |t: &str| substitute(t, &env).map_err(|e| (e.line, e.column, e.message));
        assert_eq!(s("a: ${env:PORT}\n").ok().unwrap(), "a: 9000\n");
        assert_eq!(s("a: ${env:NOPE:-x:y}").ok().unwrap(), "a: x:y");
        assert_eq!(s("a: ${env:EMPTY:-d}").ok().unwrap(), "a: d");
        assert_eq!(s("cost: $$5 and $x").ok().unwrap(), "cost: $5 and $x");
        let (line, col, msg) = s("a: 1\nb: ${env:NOPE}\n").unwrap_err();
        assert_eq!((line, col), (2, 4));
        assert!(msg.contains("`NOPE` is not set"), "{msg}");
        assert!(s("a: ${NOPE}")
            .unwrap_err()
            .2
            .contains("unsupported substitution"));
        assert!(s("a: ${env:PORT\nb: }").unwrap_err().2.contains("unclosed"));
        assert!(s("a: ${env:1X}").unwrap_err().2.contains("not a valid"));
        assert_eq!(
            s("# see ${env:NOPE}\na: 1 # or ${x}\n").ok().unwrap(),
            "# see ${env:NOPE}\na: 1 # or ${x}\n"
        );
        assert_eq!(
            s("a: \"x # ${env:PORT}\"\n").ok().unwrap(),
            "a: \"x # 9000\"\n"
        );
        assert_eq!(s("a: x#${env:PORT}\n").ok().unwrap(), "a: x#9000\n");
    }
}

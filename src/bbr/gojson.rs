//! The error text Go's `encoding/json` gives for a body it cannot decode into
//! `map[string]any`, so BBR's 400 reply reads like upstream's ("failed to parse request body:
//! <Go error>"). A byte-level scanner with the states of Go's `encoding/json/scanner.go`; it
//! only validates (the body is then parsed with serde).

/// What a container on the scanner's stack is waiting for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parse {
    ObjectKey,
    ObjectValue,
    ArrayValue,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    BeginValue,
    BeginValueOrEmpty,
    BeginStringOrEmpty,
    BeginString,
    EndValue,
    EndTop,
    InString,
    InStringEsc,
    InStringEscU(u8),
    Neg,
    One,
    Zero,
    Dot,
    Dot0,
    E,
    ESign,
    E0,
    /// Inside a literal: the rest still expected.
    Literal(&'static [u8], &'static str),
}

/// Go's `quoteChar`.
fn quote(c: u8) -> String {
    match c {
        b'\'' => "'\\''".into(),
        b'"' => "'\"'".into(),
        _ => {
            let q = format!("{:?}", char::from(c));
            // Rust's char Debug already uses single quotes; Go spells these escapes the same.
            q.replace("\\u{7f}", "\\x7f")
        }
    }
}

fn err(c: u8, context: &str) -> String {
    format!("invalid character {} {context}", quote(c))
}

/// Go's Unmarshal error for `body` into `map[string]any`, or `None` when Go accepts it (an
/// object, or `null`).
pub fn unmarshal_error(body: &[u8]) -> Option<String> {
    if let Err(e) = check_valid(body) {
        return Some(e);
    }
    let first = body.iter().find(|c| !c.is_ascii_whitespace()).copied();
    let kind = match first {
        Some(b'{') | Some(b'n') => return None,
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't') | Some(b'f') => "bool",
        _ => "number",
    };
    Some(format!(
        "json: cannot unmarshal {kind} into Go value of type map[string]interface {{}}"
    ))
}

/// Go's `checkValid`: the first syntax error, or Ok.
fn check_valid(body: &[u8]) -> Result<(), String> {
    let mut stack: Vec<Parse> = Vec::new();
    let mut state = State::BeginValue;
    for &c in body {
        state = step(state, c, &mut stack)?;
    }
    // Go's `eof`: one more space ends a top-level number or literal (or fails it).
    match step(state, b' ', &mut stack)? {
        State::EndTop => Ok(()),
        _ => Err("unexpected end of JSON input".into()),
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

fn step(state: State, c: u8, stack: &mut Vec<Parse>) -> Result<State, String> {
    use State::*;
    Ok(match state {
        BeginValueOrEmpty if is_space(c) => BeginValueOrEmpty,
        BeginValueOrEmpty if c == b']' => end_value(c, stack)?,
        BeginValueOrEmpty => step(BeginValue, c, stack)?,
        BeginValue => match c {
            _ if is_space(c) => BeginValue,
            b'{' => {
                stack.push(Parse::ObjectKey);
                BeginStringOrEmpty
            }
            b'[' => {
                stack.push(Parse::ArrayValue);
                BeginValueOrEmpty
            }
            b'"' => InString,
            b'-' => Neg,
            b'0' => Zero,
            b'1'..=b'9' => One,
            b't' => Literal(b"rue", "true"),
            b'f' => Literal(b"alse", "false"),
            b'n' => Literal(b"ull", "null"),
            _ => return Err(err(c, "looking for beginning of value")),
        },
        BeginStringOrEmpty if is_space(c) => BeginStringOrEmpty,
        BeginStringOrEmpty if c == b'}' => {
            if let Some(top) = stack.last_mut() {
                *top = Parse::ObjectValue;
            }
            end_value(c, stack)?
        }
        BeginStringOrEmpty => step(BeginString, c, stack)?,
        BeginString => match c {
            _ if is_space(c) => BeginString,
            b'"' => InString,
            _ => return Err(err(c, "looking for beginning of object key string")),
        },
        EndValue => end_value(c, stack)?,
        EndTop => {
            if is_space(c) {
                EndTop
            } else {
                return Err(err(c, "after top-level value"));
            }
        }
        InString => match c {
            b'"' => EndValue,
            b'\\' => InStringEsc,
            _ if c < 0x20 => return Err(err(c, "in string literal")),
            _ => InString,
        },
        InStringEsc => match c {
            b'b' | b'f' | b'n' | b'r' | b't' | b'\\' | b'/' | b'"' => InString,
            b'u' => InStringEscU(0),
            _ => return Err(err(c, "in string escape code")),
        },
        InStringEscU(n) => {
            if !c.is_ascii_hexdigit() {
                return Err(err(c, "in \\u hexadecimal character escape"));
            }
            if n == 3 {
                InString
            } else {
                InStringEscU(n + 1)
            }
        }
        Neg => match c {
            b'0' => Zero,
            b'1'..=b'9' => One,
            _ => return Err(err(c, "in numeric literal")),
        },
        One if c.is_ascii_digit() => One,
        One | Zero => match c {
            b'.' => Dot,
            b'e' | b'E' => E,
            _ => end_value(c, stack)?,
        },
        Dot => {
            if c.is_ascii_digit() {
                Dot0
            } else {
                return Err(err(c, "after decimal point in numeric literal"));
            }
        }
        Dot0 => match c {
            _ if c.is_ascii_digit() => Dot0,
            b'e' | b'E' => E,
            _ => end_value(c, stack)?,
        },
        E if c == b'+' || c == b'-' => ESign,
        E | ESign => {
            if c.is_ascii_digit() {
                E0
            } else {
                return Err(err(c, "in exponent of numeric literal"));
            }
        }
        E0 => {
            if c.is_ascii_digit() {
                E0
            } else {
                end_value(c, stack)?
            }
        }
        Literal(rest, word) => match rest.split_first() {
            Some((&want, tail)) if c == want => {
                if tail.is_empty() {
                    EndValue
                } else {
                    Literal(tail, word)
                }
            }
            Some((&want, _)) => {
                return Err(err(
                    c,
                    &format!("in literal {word} (expecting {})", quote(want)),
                ))
            }
            None => end_value(c, stack)?,
        },
    })
}

/// Go's `stateEndValue`: after a complete value, what the enclosing container accepts.
fn end_value(c: u8, stack: &mut Vec<Parse>) -> Result<State, String> {
    let Some(top) = stack.last_mut() else {
        return step(State::EndTop, c, stack);
    };
    if is_space(c) {
        return Ok(State::EndValue);
    }
    match *top {
        Parse::ObjectKey => {
            if c == b':' {
                *top = Parse::ObjectValue;
                Ok(State::BeginValue)
            } else {
                Err(err(c, "after object key"))
            }
        }
        Parse::ObjectValue => match c {
            b',' => {
                *top = Parse::ObjectKey;
                Ok(State::BeginString)
            }
            b'}' => {
                stack.pop();
                Ok(if stack.is_empty() {
                    State::EndTop
                } else {
                    State::EndValue
                })
            }
            _ => Err(err(c, "after object key:value pair")),
        },
        Parse::ArrayValue => match c {
            b',' => Ok(State::BeginValue),
            b']' => {
                stack.pop();
                Ok(if stack.is_empty() {
                    State::EndTop
                } else {
                    State::EndValue
                })
            }
            _ => Err(err(c, "after array element")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected texts are what Go 1.24's `json.Unmarshal(body, &map[string]any{})` returns.
    #[test]
    fn errors_read_like_go() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"{"model":"m"}"#, None),
            ("null", None),
            (" {} ", None),
            (r#"{"a":[1,2.5e-3,true,null,{"b":"\u00e9\n"}]}"#, None),
            ("", Some("unexpected end of JSON input")),
            ("   ", Some("unexpected end of JSON input")),
            (r#"{"model":"#, Some("unexpected end of JSON input")),
            (
                "not json",
                Some("invalid character 'o' in literal null (expecting 'u')"),
            ),
            (
                "hello",
                Some("invalid character 'h' looking for beginning of value"),
            ),
            (
                "{model}",
                Some("invalid character 'm' looking for beginning of object key string"),
            ),
            (
                r#"{"model" "m"}"#,
                Some("invalid character '\"' after object key"),
            ),
            (
                r#"{"model":"m" "x"}"#,
                Some("invalid character '\"' after object key:value pair"),
            ),
            (
                r#"{"a":[1 2]}"#,
                Some("invalid character '2' after array element"),
            ),
            (
                r#"{"a":1}x"#,
                Some("invalid character 'x' after top-level value"),
            ),
            (
                r#"{"a":01}"#,
                Some("invalid character '1' after object key:value pair"),
            ),
            (
                r#"{"a":1.}"#,
                Some("invalid character '}' after decimal point in numeric literal"),
            ),
            (
                r#"{"a":1e}"#,
                Some("invalid character '}' in exponent of numeric literal"),
            ),
            (
                r#"{"a":-x}"#,
                Some("invalid character 'x' in numeric literal"),
            ),
            (
                r#"{"a":tru}"#,
                Some("invalid character '}' in literal true (expecting 'e')"),
            ),
            (
                "{\"a\":\"x\ny\"}",
                Some("invalid character '\\n' in string literal"),
            ),
            (
                r#"{"a":"\q"}"#,
                Some("invalid character 'q' in string escape code"),
            ),
            (
                r#"{"a":"\u12g4"}"#,
                Some("invalid character 'g' in \\u hexadecimal character escape"),
            ),
            (
                "{'a':1}",
                Some("invalid character '\\'' looking for beginning of object key string"),
            ),
            (
                "[1]",
                Some("json: cannot unmarshal array into Go value of type map[string]interface {}"),
            ),
            (
                r#""m""#,
                Some("json: cannot unmarshal string into Go value of type map[string]interface {}"),
            ),
            (
                "1.",
                Some("invalid character ' ' after decimal point in numeric literal"),
            ),
            (
                "12",
                Some("json: cannot unmarshal number into Go value of type map[string]interface {}"),
            ),
            (
                "true",
                Some("json: cannot unmarshal bool into Go value of type map[string]interface {}"),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                unmarshal_error(body.as_bytes()).as_deref(),
                *want,
                "{body:?}"
            );
        }
    }
}

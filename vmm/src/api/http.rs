//! Just enough HTTP/1.1 for a local control API: bounded sizes, a JSON
//! body, keep-alive. The parser is a pure function so it can be fuzzed.

/// Longest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request accepted by default, head and body together.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without any query string.
    pub path: String,
    /// The body (empty when none).
    pub body: Vec<u8>,
    /// The client wants the connection closed after the answer
    /// (`Connection: close`, or HTTP/1.0 without `Connection: keep-alive`).
    pub close: bool,
}

/// A response: a status and an optional JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// JSON body.
    pub body: Option<serde_json::Value>,
}

impl Response {
    /// A status with a JSON body.
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Response {
            status,
            body: Some(body),
        }
    }

    /// An error with a message, as `{"error": "..."}`.
    pub fn error(status: u16, msg: impl Into<String>) -> Self {
        Self::json(status, serde_json::json!({ "error": msg.into() }))
    }

    /// A status with no body.
    pub fn empty(status: u16) -> Self {
        Response { status, body: None }
    }
}

/// What `parse` made of the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole request, the first `len` bytes of the buffer (what follows
    /// belongs to the next request on the connection).
    Complete {
        /// The request.
        request: Request,
        /// Its length in bytes, head and body.
        len: usize,
    },
    /// More bytes are needed.
    Partial,
}

/// Parses a request of at most [`MAX_REQUEST`] bytes from `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, Response> {
    parse_limited(buf, MAX_REQUEST)
}

/// Parses a request of at most `max` bytes (head and body) from the start
/// of `buf`; errors are the response to send back before closing (the
/// request's framing is then unknown).
pub fn parse_limited(buf: &[u8], max: usize) -> Result<Parsed, Response> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let max_head = MAX_HEAD.min(max);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Complete(_)) => {
            return Err(Response::error(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => {
            return if buf.len() > max_head {
                Err(Response::error(431, "request head too large"))
            } else {
                Ok(Parsed::Partial)
            };
        }
        Err(e) => return Err(Response::error(400, format!("malformed request: {e}"))),
    };
    let method = req.method.unwrap_or_default().to_string();
    let path = req
        .path
        .unwrap_or_default()
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut length: Option<usize> = None;
    // HTTP/1.1 keeps the connection by default, HTTP/1.0 closes it.
    let mut close = req.version != Some(1);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Response::error(400, "invalid Content-Length"))?;
            // Two different lengths make the framing ambiguous.
            if length.is_some_and(|l| l != n) {
                return Err(Response::error(400, "conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(501, "chunked bodies are not supported"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in String::from_utf8_lossy(h.value).split(',') {
                match token.trim().to_ascii_lowercase().as_str() {
                    "close" => close = true,
                    "keep-alive" => close = false,
                    _ => {}
                }
            }
        }
    }
    let length = length.unwrap_or(0);
    if length > max - head_len {
        return Err(Response::error(
            413,
            format!("request larger than {max} bytes"),
        ));
    }
    let len = head_len + length;
    let Some(body) = buf.get(head_len..len) else {
        return Ok(Parsed::Partial);
    };
    Ok(Parsed::Complete {
        request: Request {
            method,
            path,
            body: body.to_vec(),
            close,
        },
        len,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The bytes of `resp`; `close` announces that the server closes the
/// connection after it.
pub fn encode_response(resp: &Response, close: bool) -> Vec<u8> {
    let body = resp
        .body
        .as_ref()
        .map(|b| format!("{b:#}\n"))
        .unwrap_or_default();
    // A 204 has no body and, per RFC 9110, no Content-Length either.
    let length = if resp.status == 204 {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\n{length}Connection: {}\r\n\r\n{body}",
        resp.status,
        reason(resp.status),
        if close { "close" } else { "keep-alive" },
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_put_with_a_body() {
        let raw = b"PUT /balloon?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 17\r\n\r\n{\"target_mib\":64}";
        let mut two = raw.to_vec();
        two.extend_from_slice(b"GET /vm HTTP/1.1\r\n\r\n");
        let Parsed::Complete { request: r, len } = parse(&two).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/balloon"));
        assert_eq!(r.body, b"{\"target_mib\":64}");
        assert_eq!(len, raw.len(), "the next request is left alone");
        assert!(!r.close, "HTTP/1.1 keeps the connection");
        assert_eq!(parse(&raw[..raw.len() - 3]).unwrap(), Parsed::Partial);
    }

    #[test]
    fn connection_header_and_version_decide_keep_alive() {
        let close = |raw: &[u8]| match parse(raw).unwrap() {
            Parsed::Complete { request, .. } => request.close,
            Parsed::Partial => panic!("incomplete"),
        };
        assert!(close(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(close(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!close(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!close(b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n"));
    }

    #[test]
    fn the_request_limit_covers_head_and_body() {
        let head = b"PUT / HTTP/1.1\r\nContent-Length: 60\r\n\r\n";
        // Refused as soon as the head announces too much, before the body.
        assert_eq!(
            parse_limited(head, head.len() + 59).unwrap_err().status,
            413
        );
        assert_eq!(
            parse_limited(head, head.len() + 60).unwrap(),
            Parsed::Partial
        );
        assert_eq!(parse_limited(head, 10).unwrap_err().status, 431);
        let r = b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert_eq!(parse(r).unwrap_err().status, 400);
    }

    #[test]
    fn bad_requests_get_4xx() {
        assert_eq!(
            parse(b"\x01\x02 / HTTP/1.1\r\n\r\n").unwrap_err().status,
            400
        );
        let r = b"PUT / HTTP/1.1\r\nContent-Length: zz\r\n\r\n";
        assert_eq!(parse(r).unwrap_err().status, 400);
        let r = b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n";
        assert_eq!(parse(r).unwrap_err().status, 413);
        let r = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(r).unwrap_err().status, 501);
        // An endless method token is a head that never ends.
        let big = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(parse(&big).unwrap_err().status, 431);
        let mut long_head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long_head.extend(vec![b'a'; MAX_HEAD + 10]);
        assert_eq!(parse(&long_head).unwrap_err().status, 431);
    }

    #[test]
    fn responses_are_well_formed() {
        let out = encode_response(&Response::error(404, "no such thing"), false);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"));
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(head.contains("Connection: keep-alive"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "no such thing");
        let s = String::from_utf8(encode_response(&Response::empty(204), true)).unwrap();
        assert!(s.ends_with("Connection: close\r\n\r\n"), "{s}");
        assert!(!s.contains("Content-Length"), "{s}");
    }
}

//! Just enough HTTP/1.1 for a local control API: one request per
//! connection, bounded sizes, a JSON body. The parser is a pure function so
//! it can be fuzzed.

use std::io::{Read, Write};

/// Longest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Longest body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without any query string.
    pub path: String,
    /// The body (empty when none).
    pub body: Vec<u8>,
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
    /// A whole request.
    Complete(Request),
    /// More bytes are needed.
    Partial,
}

/// Parses a request from `buf`; errors are the response to send back.
pub fn parse(buf: &[u8]) -> Result<Parsed, Response> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
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
    let mut length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Response::error(400, "invalid Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(501, "chunked bodies are not supported"));
        }
    }
    if length > MAX_BODY {
        return Err(Response::error(
            413,
            format!("body larger than {MAX_BODY} bytes"),
        ));
    }
    let Some(body) = buf.get(head_len..head_len + length) else {
        return Ok(Parsed::Partial);
    };
    Ok(Parsed::Complete(Request {
        method,
        path,
        body: body.to_vec(),
    }))
}

/// Reads one request from a stream (which should have a read timeout).
pub fn read_request(stream: &mut impl Read) -> Result<Request, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Parsed::Complete(r) = parse(&buf)? {
            return Ok(r);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(Response::error(400, "connection closed mid-request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Response::error(408, format!("reading the request: {e}"))),
        }
        if buf.len() > MAX_HEAD + MAX_BODY {
            return Err(Response::error(413, "request too large"));
        }
    }
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
        _ => "",
    }
}

/// Writes `resp` and closes the exchange.
pub fn write_response(stream: &mut impl Write, resp: &Response) -> std::io::Result<()> {
    let body = resp
        .body
        .as_ref()
        .map(|b| format!("{b:#}\n"))
        .unwrap_or_default();
    write!(
        stream,
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{}",
        resp.status,
        reason(resp.status),
        body.len(),
        body
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_put_with_a_body() {
        let raw = b"PUT /balloon?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 17\r\n\r\n{\"target_mib\":64}";
        let Parsed::Complete(r) = parse(raw).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/balloon"));
        assert_eq!(r.body, b"{\"target_mib\":64}");
        assert_eq!(parse(&raw[..raw.len() - 3]).unwrap(), Parsed::Partial);
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
        let mut out = Vec::new();
        write_response(&mut out, &Response::error(404, "no such thing")).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"));
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "no such thing");
    }
}

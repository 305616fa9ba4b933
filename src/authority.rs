//! Accepts gRPC clients that send a socket path as HTTP/2 `:authority`.
//!
//! Older grpc-go (as in Debian's containerd 1.6 sources, which containerd's
//! conformance suite is built from), grpc-java and grpc-python dial a Unix
//! socket with `:authority` set to its path, e.g. `/run/x/x.sock`. The h2
//! crate under tonic rejects such a header block with PROTOCOL_ERROR, and
//! has no switch for it. [`AuthorityFix`] sits between the socket and tonic:
//! it re-encodes every client header block, replacing an `:authority` that
//! is not a valid URI authority with `localhost` (what newer gRPC clients
//! send for Unix sockets). Everything else passes through unchanged.
//!
//! HPACK is stateful per connection, so every block is decoded with a
//! decoder that mirrors the client's encoder and re-encoded with an encoder
//! that h2's decoder mirrors; that is why all blocks, not only bad ones, go
//! through it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may use; our re-encoded
/// blocks are split to fit it whatever the server advertised.
const MAX_FRAME: usize = 16_384;
/// Refuse header blocks larger than this (h2's own default limit is 16 KiB of
/// decoded headers; a much larger encoded block is an attack, not a request).
const MAX_BLOCK: usize = 1 << 20;

/// A client connection whose read side has its header blocks repaired.
pub struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from the client, not yet processed.
    input: BytesMut,
    /// Processed bytes ready for the server.
    output: BytesMut,
    preface_done: bool,
    /// Header block being collected across HEADERS + CONTINUATION frames:
    /// (stream id, flags of the HEADERS frame, fragment so far).
    block: Option<(u32, u8, Vec<u8>)>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            input: BytesMut::with_capacity(16 * 1024),
            output: BytesMut::new(),
            preface_done: false,
            block: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves every complete unit (preface, frame) from `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        if !self.preface_done {
            if self.input.len() < PREFACE.len() {
                return Ok(());
            }
            // Not HTTP/2 with prior knowledge: pass through, h2 will refuse it.
            self.output.extend_from_slice(&self.input.split_to(PREFACE.len()));
            self.preface_done = true;
        }
        while self.input.len() >= FRAME_HEADER {
            let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize;
            if self.input.len() < FRAME_HEADER + len {
                self.input.reserve(FRAME_HEADER + len - self.input.len());
                return Ok(());
            }
            let kind = self.input[3];
            let flags = self.input[4];
            let stream = u32::from_be_bytes([self.input[5], self.input[6], self.input[7], self.input[8]]) & 0x7fff_ffff;
            let frame = self.input.split_to(FRAME_HEADER + len);
            let payload = &frame[FRAME_HEADER..];
            match kind {
                HEADERS => {
                    let fragment = headers_fragment(flags, payload)?;
                    self.block = Some((stream, flags, fragment.to_vec()));
                }
                CONTINUATION => match &mut self.block {
                    Some((id, _, block)) if *id == stream => block.extend_from_slice(payload),
                    _ => {
                        // Out of sequence: let h2 see it and reject the connection.
                        self.output.extend_from_slice(&frame);
                        continue;
                    }
                },
                _ => {
                    self.output.extend_from_slice(&frame);
                    continue;
                }
            }
            if self.block.as_ref().is_some_and(|(_, _, b)| b.len() > MAX_BLOCK) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "HTTP/2 header block too large",
                ));
            }
            if flags & END_HEADERS != 0 {
                if let Some((id, first_flags, block)) = self.block.take() {
                    self.emit_block(id, first_flags & END_STREAM, &block)?;
                }
            }
        }
        Ok(())
    }

    fn emit_block(&mut self, stream: u32, end_stream: u8, block: &[u8]) -> io::Result<()> {
        let mut headers = self
            .decoder
            .decode(block)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad HTTP/2 header block: {e}")))?;
        for (name, value) in &mut headers {
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = b"localhost".to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut first = true;
        // An empty block still needs one HEADERS frame.
        let empty: &[u8] = &[];
        let mut next = chunks.next().or(Some(empty));
        while let Some(chunk) = next {
            next = chunks.next();
            let mut flags = if first { end_stream } else { 0 };
            if next.is_none() {
                flags |= END_HEADERS;
            }
            self.output.put_uint(chunk.len() as u64, 3);
            self.output.put_u8(if first { HEADERS } else { CONTINUATION });
            self.output.put_u8(flags);
            self.output.put_u32(stream);
            self.output.extend_from_slice(chunk);
            first = false;
        }
        Ok(())
    }
}

/// The header block fragment of a HEADERS frame, without padding and priority.
fn headers_fragment(flags: u8, payload: &[u8]) -> io::Result<&[u8]> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP/2 HEADERS frame");
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let pad = *payload.first().ok_or_else(bad)? as usize;
        start = 1;
        end = end.checked_sub(pad).ok_or_else(bad)?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload.get(start..end).ok_or_else(bad)
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Whatever is left unprocessed is an incomplete frame: drop it.
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.input.extend_from_slice(rb.filled());
                        this.process()?;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = <tokio::net::UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.put_uint(payload.len() as u64, 3);
        f.put_u8(kind);
        f.put_u8(flags);
        f.put_u32(stream);
        f.extend_from_slice(payload);
        f
    }

    async fn pass(input: Vec<u8>) -> Vec<u8> {
        let mut fix = AuthorityFix::new(&input[..]);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        out
    }

    fn decode_headers(out: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut dec = loona_hpack::Decoder::new();
        let mut rest = &out[PREFACE.len()..];
        let mut blocks = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            if rest[3] == HEADERS {
                blocks.push(dec.decode(&rest[9..9 + len]).unwrap());
            }
            rest = &rest[9 + len..];
        }
        blocks
    }

    #[tokio::test]
    async fn path_authority_becomes_localhost_across_blocks() {
        let mut client = loona_hpack::Encoder::new();
        let req = |auth: &'static [u8]| {
            vec![
                (&b":method"[..], &b"POST"[..]),
                (b":scheme", b"http"),
                (b":path", b"/containerd.services.snapshots.v1.Snapshots/Stat"),
                (b":authority", auth),
                (b"content-type", b"application/grpc"),
            ]
        };
        let b1 = client.encode(req(b"/tmp/x y/snap.sock"));
        let b2 = client.encode(req(b"/tmp/x y/snap.sock"));
        let b3 = client.encode(req(b"localhost:1234"));
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                             // Block 1 split across HEADERS + CONTINUATION, with padding.
        let mut padded = vec![3u8];
        padded.extend_from_slice(&b1[..5]);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | END_STREAM, 1, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &b1[5..]));
        input.extend(frame(0x0, 0, 1, b"data"));
        input.extend(frame(HEADERS, END_HEADERS, 3, &b2));
        input.extend(frame(HEADERS, END_HEADERS, 5, &b3));
        let out = pass(input).await;
        let blocks = decode_headers(&out);
        assert_eq!(blocks.len(), 3);
        let auth = |b: &Vec<(Vec<u8>, Vec<u8>)>| b.iter().find(|(n, _)| n == b":authority").unwrap().1.clone();
        assert_eq!(auth(&blocks[0]), b"localhost");
        assert_eq!(auth(&blocks[1]), b"localhost");
        assert_eq!(auth(&blocks[2]), b"localhost:1234");
        assert_eq!(blocks[0][2].1, b"/containerd.services.snapshots.v1.Snapshots/Stat");
        // END_STREAM of the first HEADERS frame survives the rewrite.
        assert_eq!(out[PREFACE.len() + 9 + 4] & END_STREAM, END_STREAM);
        assert!(out.windows(4).any(|w| w == b"data"));
    }

    #[tokio::test]
    async fn garbage_block_is_an_error_not_a_panic() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0xff]));
        let mut fix = AuthorityFix::new(&input[..]);
        let mut out = Vec::new();
        assert!(fix.read_to_end(&mut out).await.is_err());
    }
}

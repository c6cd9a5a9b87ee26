//! A connection that must begin its request in time. hyper bounds how long
//! a request's head may take only once it knows the connection speaks
//! HTTP/1, and finding that out waits, without a deadline, for bytes that
//! tell HTTP/1 from HTTP/2's preface: a client that connected and sent
//! nothing (or `P`, the preface's first byte) would hold its socket and
//! task for as long as it liked. The edge serves HTTP/1 only (its TLS
//! offers no other), so a whole HTTP/2 preface ends the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads fail with `TimedOut` if the connection has not shown it speaks
/// HTTP/1 (a byte that departs from HTTP/2's preface) within the
/// deadline; after that, reads and writes pass through.
pub(crate) struct FirstByte<S> {
    inner: S,
    /// Boxed, and gone once the connection is HTTP/1's: an idle WebSocket
    /// keeps no timer.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// How many of HTTP/2's preface bytes the connection began with.
    preface: u8,
}

/// What an HTTP/2 connection begins with (RFC 9113, 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<S> FirstByte<S> {
    pub(crate) fn new(inner: S, within: Duration) -> Self {
        FirstByte {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
            preface: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByte<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() {
                    for &byte in &buf.filled()[before..] {
                        if byte != H2_PREFACE[usize::from(this.preface)] {
                            this.deadline = None;
                            break;
                        }
                        this.preface += 1;
                        if usize::from(this.preface) == H2_PREFACE.len() {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "HTTP/2 is not served here",
                            )));
                        }
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request began in time",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByte<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

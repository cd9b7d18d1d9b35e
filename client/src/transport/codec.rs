//! A request-response codec for raw byte messages: a `u32` little-endian
//! length, then the bytes.
//!
//! libp2p's cbor/json codecs read at most 1 MiB of a request (10 MiB of a
//! response) by default: a larger one is cut there and fails to decode on
//! the receiver, and the sender only sees its stream close. This codec
//! refuses a frame above its limit with a [`FrameTooLarge`] error on
//! whichever side notices (the writer before sending, the reader after the
//! length prefix), so an oversize message is an error that says so.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

/// A frame's length exceeds the codec's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes exceeds the limit of {max} bytes")]
pub struct FrameTooLarge {
    /// Length of the refused frame.
    pub len: u64,
    /// The limit in force.
    pub max: usize,
}

/// Length-prefixed raw bytes, with a maximum frame size.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    max: usize,
}

impl Codec {
    /// A codec refusing frames over `max` bytes (capped at `u32::MAX`, the
    /// largest length the prefix can express).
    pub fn new(max: usize) -> Codec {
        Codec {
            max: max.min(u32::MAX as usize),
        }
    }

    /// The largest frame accepted, in bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    fn too_large(&self, len: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            FrameTooLarge { len, max: self.max },
        )
    }

    async fn read_frame<T: AsyncRead + Unpin + Send>(&self, io: &mut T) -> io::Result<Vec<u8>> {
        let mut prefix = [0u8; 4];
        io.read_exact(&mut prefix).await?;
        let len = u64::from(u32::from_le_bytes(prefix));
        if len > self.max as u64 {
            return Err(self.too_large(len));
        }
        // Grow toward `len` as bytes arrive rather than trusting the prefix
        // with a full allocation up front.
        let mut buf = Vec::with_capacity((len as usize).min(16 << 20));
        (&mut *io).take(len).read_to_end(&mut buf).await?;
        if buf.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("frame truncated: {} of {len} bytes", buf.len()),
            ));
        }
        Ok(buf)
    }

    async fn write_frame<T: AsyncWrite + Unpin + Send>(
        &self,
        io: &mut T,
        bytes: &[u8],
    ) -> io::Result<()> {
        if bytes.len() > self.max {
            return Err(self.too_large(bytes.len() as u64));
        }
        let len = u32::try_from(bytes.len()).expect("max is capped at u32::MAX");
        io.write_all(&len.to_le_bytes()).await?;
        io.write_all(bytes).await?;
        io.flush().await
    }
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        self.read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write_frame(io, &res).await
    }
}

/// The [`FrameTooLarge`] inside an I/O error produced by this codec, if any.
pub fn frame_too_large(err: &io::Error) -> Option<FrameTooLarge> {
    err.get_ref()?.downcast_ref::<FrameTooLarge>().copied()
}

#[cfg(test)]
mod tests {
    use futures::{executor::block_on, io::Cursor};
    use libp2p::request_response::Codec as _;

    use super::*;

    const PROTO: StreamProtocol = StreamProtocol::new("/test/1");

    #[test]
    fn round_trip() {
        block_on(async {
            let mut codec = Codec::new(1024);
            let mut wire = Cursor::new(Vec::new());
            codec
                .write_request(&PROTO, &mut wire, b"hello".to_vec())
                .await
                .unwrap();
            assert_eq!(wire.get_ref()[..4], 5u32.to_le_bytes());
            wire.set_position(0);
            let back = codec.read_request(&PROTO, &mut wire).await.unwrap();
            assert_eq!(back, b"hello");
        });
    }

    #[test]
    fn refuses_oversize_on_both_ends() {
        block_on(async {
            let mut small = Codec::new(4);
            let mut wire = Cursor::new(Vec::new());
            let err = small
                .write_response(&PROTO, &mut wire, vec![0; 5])
                .await
                .unwrap_err();
            assert_eq!(
                frame_too_large(&err),
                Some(FrameTooLarge { len: 5, max: 4 })
            );
            assert!(wire.get_ref().is_empty(), "nothing written");

            let mut big = Codec::new(1024);
            big.write_response(&PROTO, &mut wire, vec![0; 5])
                .await
                .unwrap();
            wire.set_position(0);
            let err = small.read_response(&PROTO, &mut wire).await.unwrap_err();
            assert_eq!(
                frame_too_large(&err),
                Some(FrameTooLarge { len: 5, max: 4 })
            );
        });
    }

    #[test]
    fn truncated_frame_is_an_error() {
        block_on(async {
            let mut codec = Codec::new(1024);
            let mut wire = Cursor::new([10u8, 0, 0, 0, 1, 2, 3].to_vec());
            let err = codec.read_request(&PROTO, &mut wire).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        });
    }
}

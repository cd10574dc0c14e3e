//! The protobuf codec of the generated services: prost's, except that a
//! message that does not decode is the sender's mistake, `INVALID_ARGUMENT`
//! (prost's codec says `INTERNAL`, which reads as a fault of the server).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The first decode buffer of a call, in bytes.
const DECODE_BUFFER_BYTES: usize = 512;

/// prost's codec with decode errors as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct Checked<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for Checked<T, U> {
    fn default() -> Self {
        Checked { inner: ProstCodec::default() }
    }
}

impl<T, U> Codec for Checked<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder { inner: self.inner.decoder(), _message: PhantomData }
    }
}

/// prost's decoder with decode errors as `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct CheckedDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U: Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|s| Status::invalid_argument(format!("the message does not decode: {}", s.message())))
    }

    /// A small first buffer (it grows as a message needs): tonic allocates
    /// it when a call starts, so with prost's 8 KiB a flood of calls that
    /// never send their body would cost 8 KiB each, memory the allocator
    /// keeps after they end.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BUFFER_BYTES, 32 * 1024)
    }
}

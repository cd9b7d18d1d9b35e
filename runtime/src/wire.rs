//! tch tensors ↔ [`WireTensor`]s (raw little-endian bytes with dtype and shape).

use nnmesh_protocol::{
    message::{ErrorKind, WireError},
    tensor::{WireDType, WireTensor},
};
use tch::{Device, Kind, Tensor};

fn malformed(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorKind::Malformed, msg)
}

/// Copies a tensor into a wire tensor (moved to the CPU, made contiguous).
///
/// # Errors
/// When the tensor's dtype has no wire form.
pub fn to_wire(t: &Tensor) -> Result<WireTensor, WireError> {
    let dtype = match t.kind() {
        Kind::Float => WireDType::F32,
        Kind::Half => WireDType::F16,
        Kind::BFloat16 => WireDType::Bf16,
        Kind::Int64 => WireDType::I64,
        Kind::Bool => WireDType::Bool,
        k => return Err(malformed(format!("tensor kind {k:?} has no wire form"))),
    };
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut data = vec![0u8; numel * dtype.size()];
    t.f_copy_data_u8(&mut data, numel)
        .map_err(|e| malformed(e.to_string()))?;
    Ok(WireTensor {
        dtype,
        shape: t.size().iter().map(|&d| d as u64).collect(),
        data,
    })
}

/// Builds a tensor on `device` from a wire tensor, after checking its size.
///
/// # Errors
/// When the byte length does not match dtype and shape.
pub fn from_wire(w: &WireTensor, device: Device) -> Result<Tensor, WireError> {
    w.check().map_err(|e| malformed(e.to_string()))?;
    let kind = match w.dtype {
        WireDType::F32 => Kind::Float,
        WireDType::F16 => Kind::Half,
        WireDType::Bf16 => Kind::BFloat16,
        WireDType::I64 => Kind::Int64,
        WireDType::Bool => Kind::Bool,
    };
    let shape: Vec<i64> = w.shape.iter().map(|&d| d as i64).collect();
    let t =
        Tensor::f_from_data_size(&w.data, &shape, kind).map_err(|e| malformed(e.to_string()))?;
    Ok(t.to_device(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_kind() {
        for kind in [
            Kind::Float,
            Kind::Half,
            Kind::BFloat16,
            Kind::Int64,
            Kind::Bool,
        ] {
            let t = Tensor::arange(12, (Kind::Float, Device::Cpu))
                .reshape([3, 4])
                .to_kind(kind);
            let back = from_wire(&to_wire(&t).expect("encodes"), Device::Cpu).expect("decodes");
            assert!(back.equal(&t), "{kind:?}");
        }
        // A non-contiguous view travels as its logical values.
        let t = Tensor::arange(12, (Kind::Float, Device::Cpu))
            .reshape([3, 4])
            .transpose(0, 1);
        assert!(
            from_wire(&to_wire(&t).expect("encodes"), Device::Cpu)
                .expect("decodes")
                .equal(&t)
        );
    }

    #[test]
    fn bad_sizes_are_rejected() {
        let w = WireTensor {
            dtype: WireDType::F32,
            shape: vec![2, 2],
            data: vec![0; 15],
        };
        assert!(from_wire(&w, Device::Cpu).is_err());
    }
}

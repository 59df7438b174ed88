//! Wire format of a model update sent from a node to a neighbour.
//!
//! ```text
//! magic "ESUP" | version u16 | flags u8 | encoding u8 | round u64 | base_version u64
//! federation str | sender str | fingerprint str          (str = u16 length + UTF-8)
//! tensor count u32
//! per tensor: name str | ndim u8 | dims u32 x ndim | payload length u32 | payload
//! ```
//! All integers little-endian. Payloads by encoding:
//! - fp32: one f32 per entry; fp16: one IEEE half per entry;
//! - int8: a f32 scale, then one i8 per entry (value = i8 x scale);
//! - top-k: k u32, a f32 scale, then k indices as LEB128 varints of the gap to the previous
//!   kept index (the first counts from 0), then k i8 values (value = i8 x scale); other
//!   entries are zero. At 10% density this is about two bytes per kept entry.
//! - quantised: bits u8 (2 to 8), a f32 scale per block of 256 entries, then every entry's
//!   code packed into `bits` bits, least significant first; a code `c` stands for
//!   `(c - L) x scale` with `L = 2^(bits-1) - 1`, so codes run from 0 to `2L`. At 3 bits
//!   this is 3.125 bits per entry, about a tenth of fp32.
//!
//! Decoding checks every length against the frame and the receiver's model before it
//! allocates, and rejects non-finite values, so a hostile or corrupt frame costs at most
//! its own size and is never applied. Nothing here is language-specific serialisation.

use std::collections::HashMap;

use half::f16;
use tch::{Kind, Tensor};

const MAGIC: &[u8; 4] = b"ESUP";
pub const WIRE_VERSION: u16 = 1;
const FLAG_KEYFRAME: u8 = 1;
const MAX_STRING: usize = 256;
const MAX_DIMS: usize = 8;

/// How tensor values are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Encoding {
    Fp32,
    Fp16,
    Int8,
    /// Keep this fraction of entries with the largest magnitude.
    TopK(f64),
    /// Round every entry to one of `2^bits - 1` levels scaled per block.
    Quantized(u8),
}

/// Entries that share one scale in the quantised encoding: small enough that one large
/// value does not flatten a whole tensor to zero, large enough that scales cost little.
const QUANT_BLOCK: usize = 256;

impl Encoding {
    fn tag(self) -> u8 {
        match self {
            Encoding::Fp32 => 0,
            Encoding::Fp16 => 1,
            Encoding::Int8 => 2,
            Encoding::TopK(_) => 3,
            Encoding::Quantized(_) => 4,
        }
    }
}

/// Everything in an update but its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub federation: String,
    pub sender: String,
    pub round: u64,
    /// For a difference: the version of the sender's public estimate it applies to.
    /// For a keyframe: the version the carried values are.
    pub base_version: u64,
    pub keyframe: bool,
    pub fingerprint: String,
}

/// A decoded update: dense `f32` tensors by parameter name, each a parameter of the model
/// the header's fingerprint names, with that model's shape for it.
#[derive(Debug)]
pub struct Update {
    pub header: Header,
    pub tensors: Vec<(String, Tensor)>,
}

/// Why a frame was refused. [`DecodeError::reason`] gives a fixed label for metrics.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("frame truncated at byte {0}")]
    Truncated(usize),
    #[error("wrong magic number")]
    BadMagic,
    #[error("unsupported wire version {0}")]
    BadVersion(u16),
    #[error("unknown encoding {0}")]
    BadEncoding(u8),
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("string field longer than {MAX_STRING} bytes or not UTF-8")]
    BadString,
    #[error("header flags {0:#04x} set bits this version does not define")]
    BadFlags(u8),
    #[error("a tensor of rank {0}: at most {MAX_DIMS} dimensions are allowed")]
    BadRank(usize),
    #[error("update is for federation {0:?}")]
    WrongFederation(String),
    #[error("model fingerprint {0:?} is no member's model")]
    UnknownModel(String),
    #[error("parameter {name} declares shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<i64>,
        expected: Vec<i64>,
    },
    #[error("parameter {0} appears twice")]
    Duplicate(String),
    #[error("parameter {name}: payload of {found} bytes, expected {expected}")]
    PayloadLength {
        name: String,
        found: usize,
        expected: usize,
    },
    #[error("parameter {0}: top-k indices out of range or not increasing")]
    BadIndices(String),
    #[error("parameter {0}: quantised bit width or codes out of range")]
    BadCodes(String),
    #[error("parameter {0} holds NaN or infinite values")]
    NonFinite(String),
    #[error("{0} bytes left over after the last tensor")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// A bounded label naming the kind of rejection.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated(_) => "truncated",
            DecodeError::BadMagic => "magic",
            DecodeError::BadVersion(_) => "version",
            DecodeError::BadEncoding(_)
            | DecodeError::BadString
            | DecodeError::BadFlags(_)
            | DecodeError::BadRank(_) => "malformed",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::WrongFederation(_) => "federation",
            DecodeError::UnknownModel(_) => "fingerprint",
            DecodeError::ShapeMismatch { .. } | DecodeError::Duplicate(_) => "shape",
            DecodeError::PayloadLength { .. }
            | DecodeError::BadIndices(_)
            | DecodeError::BadCodes(_) => "malformed",
            DecodeError::NonFinite(_) => "non_finite",
            DecodeError::TrailingBytes(_) => "malformed",
        }
    }
}

/// What the members' models look like; decoding checks frames against them.
#[derive(Debug, Clone)]
pub struct Layout {
    pub federation: String,
    /// Parameter shapes by name, for each member model by fingerprint.
    pub models: HashMap<String, HashMap<String, Vec<i64>>>,
    /// Largest frame accepted: a full-precision frame of the largest member model, with
    /// room for headers. Anything larger is refused before it is read.
    pub max_frame: usize,
}

impl Layout {
    /// The layout of a federation whose members all have the model `params`, of
    /// fingerprint `fingerprint`; [`Layout::with_model`] adds the others.
    pub fn new(federation: &str, fingerprint: &str, params: &[(String, Tensor)]) -> Layout {
        let layout = Layout {
            federation: federation.to_string(),
            models: HashMap::new(),
            max_frame: 0,
        };
        let shapes = params.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        layout.with_model(fingerprint, shapes)
    }

    /// Also accepts frames from members whose model is `fingerprint`, with these
    /// parameter names and shapes.
    pub fn with_model(mut self, fingerprint: &str, shapes: Vec<(String, Vec<i64>)>) -> Layout {
        let values: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().map(|&d| d.max(0) as usize).product::<usize>())
            .sum();
        // Twice the fp32 size, per-tensor headers and a fixed allowance: generous for any
        // encoding of this model, and still a bound set by the model, not the sender.
        let frame = 2 * 4 * values + 1024 * shapes.len() + 64 * 1024;
        self.max_frame = self.max_frame.max(frame);
        self.models
            .insert(fingerprint.to_string(), shapes.into_iter().collect());
        self
    }
}

/// Encodes `tensors` (any float kind, any layout) and returns the frame together with the
/// values a receiver will decode from it, which the sender needs to track exactly what its
/// neighbours know.
pub fn encode(
    header: &Header,
    tensors: &[(String, Tensor)],
    encoding: Encoding,
) -> (Vec<u8>, Vec<Tensor>) {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    out.push(if header.keyframe { FLAG_KEYFRAME } else { 0 });
    out.push(encoding.tag());
    out.extend_from_slice(&header.round.to_le_bytes());
    out.extend_from_slice(&header.base_version.to_le_bytes());
    for s in [&header.federation, &header.sender, &header.fingerprint] {
        put_str(&mut out, s);
    }
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());

    let mut decoded = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let shape = tensor.size();
        let flat = tensor
            .detach()
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .view([-1]);
        let values: Vec<f32> = Vec::try_from(&flat).unwrap_or_default();
        let (payload, dense) = encode_values(&values, encoding);
        put_str(&mut out, name);
        out.push(shape.len() as u8);
        for &d in &shape {
            out.extend_from_slice(&(d as u32).to_le_bytes());
        }
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        decoded.push(Tensor::from_slice(&dense).view(shape.as_slice()));
    }
    (out, decoded)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(MAX_STRING)];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Encodes one flat tensor; returns the payload and the dense values it decodes to.
fn encode_values(values: &[f32], encoding: Encoding) -> (Vec<u8>, Vec<f32>) {
    match encoding {
        Encoding::Fp32 => (
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            values.to_vec(),
        ),
        Encoding::Fp16 => {
            let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
            let payload = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
            (payload, halves.iter().map(|h| h.to_f32()).collect())
        }
        Encoding::Int8 => {
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            let quantised: Vec<i8> = values
                .iter()
                .map(|&v| (v / scale).round().clamp(-127.0, 127.0) as i8)
                .collect();
            let mut payload = scale.to_le_bytes().to_vec();
            payload.extend(quantised.iter().map(|&q| q as u8));
            (
                payload,
                quantised.iter().map(|&q| q as f32 * scale).collect(),
            )
        }
        Encoding::TopK(fraction) => {
            let k = ((values.len() as f64 * fraction).ceil() as usize).clamp(1, values.len());
            let mut order: Vec<u32> = (0..values.len() as u32).collect();
            // Partial selection: the k largest magnitudes, then back to index order.
            order.select_nth_unstable_by(k - 1, |&a, &b| {
                values[b as usize]
                    .abs()
                    .total_cmp(&values[a as usize].abs())
            });
            let mut kept = order[..k].to_vec();
            kept.sort_unstable();
            let max = kept
                .iter()
                .fold(0f32, |m, &i| m.max(values[i as usize].abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            let mut payload = (k as u32).to_le_bytes().to_vec();
            payload.extend(scale.to_le_bytes());
            let mut next = 0u32;
            for &i in &kept {
                put_varint(&mut payload, i - next);
                next = i + 1;
            }
            let mut dense = vec![0f32; values.len()];
            for &i in &kept {
                let q = (values[i as usize] / scale).round().clamp(-127.0, 127.0) as i8;
                payload.push(q as u8);
                dense[i as usize] = q as f32 * scale;
            }
            (payload, dense)
        }
        Encoding::Quantized(bits) => quantize(values, bits.clamp(2, 8)),
    }
}

/// The largest code magnitude at `bits` bits: codes are symmetric around zero.
fn quant_levels(bits: u8) -> i32 {
    (1 << (bits - 1)) - 1
}

fn quantize(values: &[f32], bits: u8) -> (Vec<u8>, Vec<f32>) {
    let levels = quant_levels(bits);
    let blocks = values.len().div_ceil(QUANT_BLOCK);
    let mut payload =
        Vec::with_capacity(1 + 4 * blocks + (values.len() * bits as usize).div_ceil(8));
    payload.push(bits);
    let mut dense = Vec::with_capacity(values.len());
    let mut codes = Vec::with_capacity(values.len());
    for block in values.chunks(QUANT_BLOCK) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / levels as f32 } else { 1.0 };
        payload.extend(scale.to_le_bytes());
        for &v in block {
            let q = ((v / scale).round() as i32).clamp(-levels, levels);
            codes.push((q + levels) as u32);
            dense.push(q as f32 * scale);
        }
    }
    pack_bits(&codes, bits, &mut payload);
    (payload, dense)
}

/// Appends `codes`, each `bits` wide, as a little-endian bit stream.
fn pack_bits(codes: &[u32], bits: u8, out: &mut Vec<u8>) {
    let mut buffer = 0u64;
    let mut filled = 0u32;
    for &code in codes {
        buffer |= (code as u64) << filled;
        filled += bits as u32;
        while filled >= 8 {
            out.push(buffer as u8);
            buffer >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(buffer as u8);
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a LEB128 varint of at most five bytes from `bytes` at `pos`.
fn get_varint(bytes: &[u8], pos: &mut usize) -> Option<u32> {
    let mut value = 0u64;
    for shift in 0..5 {
        let byte = *bytes.get(*pos)?;
        *pos += 1;
        value |= ((byte & 0x7f) as u64) << (7 * shift);
        if byte & 0x80 == 0 {
            return u32::try_from(value).ok();
        }
    }
    None
}

/// A cursor over a frame that never reads past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Truncated(self.pos))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated(self.pos))?;
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        if len > MAX_STRING {
            return Err(DecodeError::BadString);
        }
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| DecodeError::BadString)
    }
}

/// Decodes and validates a frame against the receiver's `layout`: the fingerprint must name
/// a member model, and every tensor must be a parameter of that model with its shape.
pub fn decode(bytes: &[u8], layout: &Layout) -> Result<Update, DecodeError> {
    if bytes.len() > layout.max_frame {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: layout.max_frame,
        });
    }
    let mut r = Reader { bytes, pos: 0 };
    if r.take(4)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = r.u16()?;
    if version != WIRE_VERSION {
        return Err(DecodeError::BadVersion(version));
    }
    let flags = r.u8()?;
    if flags & !FLAG_KEYFRAME != 0 {
        return Err(DecodeError::BadFlags(flags));
    }
    let encoding_tag = r.u8()?;
    if encoding_tag > 4 {
        return Err(DecodeError::BadEncoding(encoding_tag));
    }
    let round = r.u64()?;
    let base_version = r.u64()?;
    let header = Header {
        federation: r.string()?,
        sender: r.string()?,
        fingerprint: r.string()?,
        round,
        base_version,
        keyframe: flags & FLAG_KEYFRAME != 0,
    };
    if header.federation != layout.federation {
        return Err(DecodeError::WrongFederation(header.federation));
    }
    let Some(shapes) = layout.models.get(&header.fingerprint) else {
        return Err(DecodeError::UnknownModel(header.fingerprint));
    };

    let count = r.u32()? as usize;
    let mut tensors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..count {
        let name = r.string()?;
        let ndim = r.u8()? as usize;
        if ndim > MAX_DIMS {
            return Err(DecodeError::BadRank(ndim));
        }
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(r.u32()? as i64);
        }
        let payload_len = r.u32()? as usize;
        let payload = r.take(payload_len)?;
        if !seen.insert(name.clone()) {
            return Err(DecodeError::Duplicate(name));
        }
        match shapes.get(&name) {
            Some(expected) if *expected == shape => {}
            expected => {
                return Err(DecodeError::ShapeMismatch {
                    name,
                    found: shape,
                    expected: expected.cloned().unwrap_or_default(),
                })
            }
        }
        // The shape is a member model's, so the entry count is bounded by that model.
        let numel: usize = shape.iter().map(|&d| d as usize).product();
        let values = decode_values(&name, payload, numel, encoding_tag)?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(DecodeError::NonFinite(name));
        }
        tensors.push((name, Tensor::from_slice(&values).view(shape.as_slice())));
    }
    if r.pos != bytes.len() {
        return Err(DecodeError::TrailingBytes(bytes.len() - r.pos));
    }
    Ok(Update { header, tensors })
}

fn decode_values(
    name: &str,
    payload: &[u8],
    numel: usize,
    encoding_tag: u8,
) -> Result<Vec<f32>, DecodeError> {
    let length_error = |expected: usize| DecodeError::PayloadLength {
        name: name.to_string(),
        found: payload.len(),
        expected,
    };
    let f32s = |bytes: &[u8]| -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    match encoding_tag {
        0 => {
            if payload.len() != 4 * numel {
                return Err(length_error(4 * numel));
            }
            Ok(f32s(payload))
        }
        1 => {
            if payload.len() != 2 * numel {
                return Err(length_error(2 * numel));
            }
            Ok(payload
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect())
        }
        2 => {
            if payload.len() != 4 + numel {
                return Err(length_error(4 + numel));
            }
            let scale = f32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
            Ok(payload[4..]
                .iter()
                .map(|&q| q as i8 as f32 * scale)
                .collect())
        }
        4 => dequantize(name, payload, numel),
        _ => {
            if payload.len() < 8 {
                return Err(length_error(8));
            }
            let k = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
            let scale = f32::from_le_bytes(payload[4..8].try_into().expect("4 bytes"));
            // Each kept entry costs at least two bytes, so k is bounded by the payload
            // before anything is allocated for it.
            if !scale.is_finite() {
                return Err(DecodeError::NonFinite(name.to_string()));
            }
            if k > numel || k > payload.len() / 2 {
                return Err(length_error(8 + 2 * k.min(numel)));
            }
            let bad_indices = || DecodeError::BadIndices(name.to_string());
            let mut pos = 8;
            let mut indices = Vec::with_capacity(k);
            let mut next = 0u64;
            for _ in 0..k {
                let gap = get_varint(payload, &mut pos).ok_or_else(bad_indices)?;
                let index = next + gap as u64;
                if index >= numel as u64 {
                    return Err(bad_indices());
                }
                indices.push(index as usize);
                next = index + 1;
            }
            if payload.len() != pos + k {
                return Err(length_error(pos + k));
            }
            let mut dense = vec![0f32; numel];
            for (&i, &q) in indices.iter().zip(&payload[pos..]) {
                dense[i] = q as i8 as f32 * scale;
            }
            Ok(dense)
        }
    }
}

fn dequantize(name: &str, payload: &[u8], numel: usize) -> Result<Vec<f32>, DecodeError> {
    let malformed = || DecodeError::BadCodes(name.to_string());
    let bits = *payload.first().ok_or(DecodeError::PayloadLength {
        name: name.to_string(),
        found: 0,
        expected: 1,
    })?;
    if !(2..=8).contains(&bits) {
        return Err(malformed());
    }
    let blocks = numel.div_ceil(QUANT_BLOCK);
    let expected = 1 + 4 * blocks + (numel * bits as usize).div_ceil(8);
    if payload.len() != expected {
        return Err(DecodeError::PayloadLength {
            name: name.to_string(),
            found: payload.len(),
            expected,
        });
    }
    let levels = quant_levels(bits);
    let scales: Vec<f32> = payload[1..1 + 4 * blocks]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let mut stream = payload[1 + 4 * blocks..].iter();
    let mut buffer = 0u64;
    let mut filled = 0u32;
    let mask = (1u64 << bits) - 1;
    let mut dense = Vec::with_capacity(numel);
    for i in 0..numel {
        while filled < bits as u32 {
            // The length check above guarantees enough bytes for every code.
            buffer |= (*stream.next().ok_or_else(malformed)? as u64) << filled;
            filled += 8;
        }
        let code = (buffer & mask) as i32;
        buffer >>= bits;
        filled -= bits as u32;
        if code > 2 * levels {
            return Err(malformed());
        }
        dense.push((code - levels) as f32 * scales[i / QUANT_BLOCK]);
    }
    Ok(dense)
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn params() -> Vec<(String, Tensor)> {
        tch::manual_seed(3);
        vec![
            (
                "conv.weight".into(),
                Tensor::randn([4, 2, 3, 3], (Kind::Float, Device::Cpu)),
            ),
            (
                "fc.bias".into(),
                Tensor::randn([10], (Kind::Float, Device::Cpu)),
            ),
        ]
    }

    fn header() -> Header {
        Header {
            federation: "demo".into(),
            sender: "a".into(),
            round: 7,
            base_version: 6,
            keyframe: false,
            fingerprint: "f00d".into(),
        }
    }

    fn layout() -> Layout {
        Layout::new("demo", "f00d", &params())
    }

    fn max_error(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn every_encoding_round_trips_to_what_the_sender_predicted() {
        // Drawn once: tests run in parallel and share libtorch's global generator.
        let params = params();
        for encoding in [
            Encoding::Fp32,
            Encoding::Fp16,
            Encoding::Int8,
            Encoding::TopK(0.25),
            Encoding::Quantized(3),
            Encoding::Quantized(8),
        ] {
            let (frame, predicted) = encode(&header(), &params, encoding);
            let update = decode(&frame, &layout()).unwrap();
            assert_eq!(update.header, header());
            for ((name, got), (want_name, original)) in update.tensors.iter().zip(&params) {
                assert_eq!(name, want_name);
                let p = &predicted[update.tensors.iter().position(|t| &t.0 == name).unwrap()];
                assert_eq!(max_error(got, p), 0.0, "{encoding:?} {name}");
                let tolerance = match encoding {
                    Encoding::Fp32 => 0.0,
                    Encoding::Fp16 => 0.01,
                    Encoding::Int8 => 0.05,
                    Encoding::TopK(_) => f64::INFINITY,
                    // Half a step of the largest block's scale (max |x| of randn < 5).
                    Encoding::Quantized(bits) => 2.5 / quant_levels(bits) as f64,
                };
                assert!(max_error(got, original) <= tolerance, "{encoding:?} {name}");
            }
        }
    }

    #[test]
    fn top_k_keeps_the_largest_entries_and_shrinks_the_frame() {
        let values = Tensor::from_slice(&[0.1f32, -5.0, 0.2, 3.0, 0.0, -0.3, 0.05, 0.01]);
        let tensors = vec![("fc.bias".to_string(), values)];
        let small = Layout::new("demo", "f00d", &tensors);
        let (frame, _) = encode(&header(), &tensors, Encoding::TopK(0.25));
        let got: Vec<f32> = Vec::try_from(&decode(&frame, &small).unwrap().tensors[0].1).unwrap();
        let scale = 5.0f32 / 127.0;
        let three = (3.0f32 / scale).round() * scale;
        assert_eq!(got, vec![0.0, -5.0, 0.0, three, 0.0, 0.0, 0.0, 0.0]);

        let big = vec![(
            "fc.weight".to_string(),
            Tensor::randn([100, 100], (Kind::Float, Device::Cpu)),
        )];
        let (dense, _) = encode(&header(), &big, Encoding::Fp32);
        let (sparse, _) = encode(&header(), &big, Encoding::TopK(0.1));
        assert!(
            sparse.len() * 8 < dense.len(),
            "{} vs {}",
            sparse.len(),
            dense.len()
        );
    }

    #[test]
    fn quantised_frames_are_a_tenth_of_fp32_and_codes_are_checked() {
        let big = vec![(
            "fc.weight".to_string(),
            Tensor::randn([100, 100], (Kind::Float, Device::Cpu)),
        )];
        let big_layout = Layout::new("demo", "f00d", &big);
        let (dense, _) = encode(&header(), &big, Encoding::Fp32);
        let (three, _) = encode(&header(), &big, Encoding::Quantized(3));
        assert!(
            three.len() * 10 < dense.len(),
            "{} vs {}",
            three.len(),
            dense.len()
        );

        // Each block keeps its own scale: a huge entry in the first block leaves the
        // second block's small values representable.
        let mut values = vec![0.01f32; 2 * QUANT_BLOCK];
        values[0] = 1000.0;
        let tensors = vec![("w".to_string(), Tensor::from_slice(&values))];
        let small = Layout::new("demo", "f00d", &tensors);
        let (frame, _) = encode(&header(), &tensors, Encoding::Quantized(3));
        let got: Vec<f32> = Vec::try_from(&decode(&frame, &small).unwrap().tensors[0].1).unwrap();
        assert_eq!(got[1], 0.0);
        assert!((got[QUANT_BLOCK] - 0.01).abs() < 1e-6);

        // At 2 bits the code 3 names no level; a frame carrying it is refused.
        let (mut frame, _) = encode(&header(), &tensors, Encoding::Quantized(2));
        let last = frame.len() - 1;
        frame[last] = 0xff;
        assert!(matches!(
            decode(&frame, &small),
            Err(DecodeError::BadCodes(_))
        ));
        let (mut frame, _) = encode(&header(), &big, Encoding::Quantized(3));
        let bits_at = frame.len() - (1 + 4 * 40 + (10_000 * 3usize).div_ceil(8));
        frame[bits_at] = 9;
        assert!(matches!(
            decode(&frame, &big_layout),
            Err(DecodeError::BadCodes(_))
        ));
    }

    #[test]
    fn every_truncation_is_rejected_without_panicking() {
        let (frame, _) = encode(&header(), &params(), Encoding::Int8);
        for len in 0..frame.len() {
            assert!(
                decode(&frame[..len], &layout()).is_err(),
                "prefix of {len} accepted"
            );
        }
    }

    #[test]
    fn corrupt_frames_are_rejected_with_a_reason() {
        let (frame, _) = encode(&header(), &params(), Encoding::Fp32);
        let mut bad = frame.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad, &layout()).unwrap_err().reason(), "magic");

        let mut bad = frame.clone();
        bad[4] = 9;
        assert_eq!(decode(&bad, &layout()).unwrap_err().reason(), "version");

        let mut bad = frame.clone();
        let n = bad.len();
        bad[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode(&bad, &layout()).unwrap_err().reason(), "non_finite");

        let mut bad = frame.clone();
        bad.push(0);
        assert_eq!(decode(&bad, &layout()).unwrap_err().reason(), "malformed");

        // Flag bits this version does not define: a newer or a corrupt sender.
        let mut bad = frame.clone();
        bad[6] |= 0x80;
        let err = decode(&bad, &layout()).unwrap_err();
        assert_eq!(err, DecodeError::BadFlags(0x80));
        assert_eq!(err.reason(), "malformed");

        let mut tight = layout();
        tight.max_frame = 100;
        assert_eq!(decode(&frame, &tight).unwrap_err().reason(), "too_large");

        let mut other = layout();
        other.federation = "elsewhere".into();
        assert_eq!(decode(&frame, &other).unwrap_err().reason(), "federation");
    }

    #[test]
    fn frames_must_carry_a_member_model_with_its_shapes() {
        let mut wide = params();
        wide[1].1 = Tensor::zeros([20], (Kind::Float, Device::Cpu));
        let (frame, _) = encode(&header(), &wide, Encoding::Fp32);
        assert_eq!(decode(&frame, &layout()).unwrap_err().reason(), "shape");

        // Another architecture is decoded whole, in its own shapes, once it is a member's.
        let mut other_model = header();
        other_model.fingerprint = "beef".into();
        let (frame, _) = encode(&other_model, &wide, Encoding::Fp32);
        let err = decode(&frame, &layout()).unwrap_err();
        assert_eq!(err, DecodeError::UnknownModel("beef".into()));
        assert_eq!(err.reason(), "fingerprint");
        let shapes = wide.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        let both = layout().with_model("beef", shapes);
        let update = decode(&frame, &both).unwrap();
        assert_eq!(update.tensors.len(), 2);
        assert_eq!(update.tensors[1].1.size(), vec![20]);
    }

    #[test]
    fn oversized_declared_lengths_are_refused_before_allocation() {
        let (mut frame, _) = encode(&header(), &params(), Encoding::TopK(0.5));
        // The first tensor's k sits right after its name, rank, dims and payload length.
        let name_end = frame.windows(11).position(|w| w == b"conv.weight").unwrap() + 11;
        let k_at = name_end + 1 + 4 * 4 + 4;
        frame[k_at..k_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&frame, &layout()).unwrap_err().reason(), "malformed");
    }

    #[test]
    fn top_k_indices_past_the_end_are_refused() {
        let tensors = vec![("fc.bias".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))];
        let small = Layout::new("demo", "f00d", &tensors);
        let (mut frame, _) = encode(&header(), &tensors, Encoding::TopK(0.5));
        // One kept entry: k, scale, one varint gap, one value. Point the gap past the end.
        let gap_at = frame.len() - 2;
        frame[gap_at] = 5;
        assert_eq!(decode(&frame, &small).unwrap_err().reason(), "malformed");
    }

    /// A frame with `header()` and hand-made tensor records, for declarations that
    /// `encode` never writes.
    fn raw_frame(encoding_tag: u8, records: &[(&str, &[u32], &[u8])]) -> Vec<u8> {
        let (mut frame, _) = encode(&header(), &[], Encoding::Fp32);
        // The encoding byte follows magic, version and flags; the tensor count ends the
        // header.
        frame[7] = encoding_tag;
        let count_at = frame.len() - 4;
        frame[count_at..].copy_from_slice(&(records.len() as u32).to_le_bytes());
        for (name, dims, payload) in records {
            put_str(&mut frame, name);
            frame.push(dims.len() as u8);
            for d in dims.iter() {
                frame.extend_from_slice(&d.to_le_bytes());
            }
            frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            frame.extend_from_slice(payload);
        }
        frame
    }

    fn fp32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn reason(frame: &[u8]) -> &'static str {
        decode(frame, &layout()).unwrap_err().reason()
    }

    #[test]
    fn hand_made_frames_decode_like_encoded_ones() {
        // Keeps the rejection tests below honest: their frames differ from this one only
        // in the field under test.
        let bias = fp32_bytes(&[0.5; 10]);
        let update = decode(&raw_frame(0, &[("fc.bias", &[10], &bias)]), &layout()).unwrap();
        assert_eq!(update.header, header());
        assert_eq!(update.tensors.len(), 1);
        assert_eq!(update.tensors[0].1.size(), vec![10]);
    }

    #[test]
    fn a_parameter_sent_twice_is_refused() {
        let bias = fp32_bytes(&[0.5; 10]);
        let frame = raw_frame(0, &[("fc.bias", &[10], &bias), ("fc.bias", &[10], &bias)]);
        let error = decode(&frame, &layout()).unwrap_err();
        assert_eq!(error, DecodeError::Duplicate("fc.bias".into()));
        assert_eq!(error.reason(), "shape");
    }

    #[test]
    fn counts_that_disagree_with_the_shape_or_the_frame_are_refused() {
        let bias = fp32_bytes(&[0.5; 10]);
        // Nine values for a ten-entry bias, in each encoding's own terms.
        assert_eq!(
            reason(&raw_frame(0, &[("fc.bias", &[10], &bias[..36])])),
            "malformed"
        );
        assert_eq!(
            reason(&raw_frame(1, &[("fc.bias", &[10], &[0; 18])])),
            "malformed"
        );
        assert_eq!(
            reason(&raw_frame(2, &[("fc.bias", &[10], &[0; 4 + 9])])),
            "malformed"
        );
        assert_eq!(
            reason(&raw_frame(4, &[("fc.bias", &[10], &[8; 1 + 4 + 9])])),
            "malformed"
        );
        // A tensor count larger than the tensors the frame holds.
        let mut frame = raw_frame(0, &[("fc.bias", &[10], &bias)]);
        let count_at = raw_frame(0, &[]).len() - 4;
        frame[count_at] = 2;
        assert_eq!(reason(&frame), "truncated");
        // Same model, yet a parameter the receiver does not have.
        let frame = raw_frame(0, &[("fc.extra", &[10], &bias)]);
        assert!(matches!(
            decode(&frame, &layout()),
            Err(DecodeError::ShapeMismatch { expected, .. }) if expected.is_empty()
        ));
        // More dimensions than any tensor has.
        let frame = raw_frame(0, &[("fc.bias", &[1; 9], &bias)]);
        assert_eq!(
            decode(&frame, &layout()).unwrap_err(),
            DecodeError::BadRank(9)
        );
        assert_eq!(reason(&frame), "malformed");
        assert_eq!(reason(&raw_frame(5, &[])), "malformed");
    }

    #[test]
    fn oversized_declared_lengths_are_truncation_not_allocation() {
        let bias = fp32_bytes(&[0.5; 10]);
        let frame = raw_frame(0, &[("fc.bias", &[10], &bias)]);
        let header_len = raw_frame(0, &[]).len();
        let with = |at: usize, bytes: &[u8]| {
            let mut bad = frame.clone();
            bad[at..at + bytes.len()].copy_from_slice(bytes);
            bad
        };
        // Four billion tensors, then a four-gigabyte payload: neither is reserved for.
        assert_eq!(
            reason(&with(header_len - 4, &u32::MAX.to_le_bytes())),
            "truncated"
        );
        let dims_at = header_len + 2 + "fc.bias".len() + 1;
        assert_eq!(
            reason(&with(dims_at + 4, &u32::MAX.to_le_bytes())),
            "truncated"
        );
        // A name longer than any name is refused before it is read.
        assert_eq!(
            reason(&with(header_len, &u16::MAX.to_le_bytes())),
            "malformed"
        );
        // A dimension of four billion for a parameter the receiver holds with ten.
        assert_eq!(reason(&with(dims_at, &u32::MAX.to_le_bytes())), "shape");
    }

    #[test]
    fn infinite_values_are_refused_in_every_encoding() {
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut values = [0.5f32; 10];
            values[3] = bad;
            let frame = raw_frame(0, &[("fc.bias", &[10], &fp32_bytes(&values))]);
            assert_eq!(reason(&frame), "non_finite", "fp32 {bad}");
        }
        // 0x7c00 is +inf in IEEE half precision.
        let mut halves = vec![0u8; 20];
        halves[4..6].copy_from_slice(&0x7c00u16.to_le_bytes());
        assert_eq!(
            reason(&raw_frame(1, &[("fc.bias", &[10], &halves)])),
            "non_finite"
        );
        // A non-finite scale, or a finite one whose products overflow.
        for scale in [f32::INFINITY, f32::NAN, f32::MAX] {
            let mut int8 = scale.to_le_bytes().to_vec();
            int8.extend([127u8; 10]);
            let frame = raw_frame(2, &[("fc.bias", &[10], &int8)]);
            assert_eq!(reason(&frame), "non_finite", "int8 scale {scale}");

            // One kept entry at index 0 with the largest code.
            let mut top_k = 1u32.to_le_bytes().to_vec();
            top_k.extend(scale.to_le_bytes());
            top_k.extend([0, 127]);
            let frame = raw_frame(3, &[("fc.bias", &[10], &top_k)]);
            assert_eq!(reason(&frame), "non_finite", "top-k scale {scale}");

            // Eight bits, one block: code 254 is the top level, 127 is zero.
            let mut quantised = vec![8u8];
            quantised.extend(scale.to_le_bytes());
            quantised.extend([254u8; 10]);
            let frame = raw_frame(4, &[("fc.bias", &[10], &quantised)]);
            assert_eq!(reason(&frame), "non_finite", "quantised scale {scale}");
        }
        // Even a zero code times a NaN scale is NaN, not zero.
        let mut quantised = vec![8u8];
        quantised.extend(f32::NAN.to_le_bytes());
        quantised.extend([127u8; 10]);
        assert_eq!(
            reason(&raw_frame(4, &[("fc.bias", &[10], &quantised)])),
            "non_finite"
        );
    }

    #[test]
    fn every_rejection_reason_is_a_counted_label() {
        // A reason missing from the metrics' fixed set would be counted as "other".
        let name = || "w".to_string();
        let errors = [
            DecodeError::Truncated(0),
            DecodeError::BadMagic,
            DecodeError::BadVersion(2),
            DecodeError::BadEncoding(9),
            DecodeError::TooLarge { size: 2, limit: 1 },
            DecodeError::BadString,
            DecodeError::WrongFederation(name()),
            DecodeError::UnknownModel(name()),
            DecodeError::BadFlags(0x80),
            DecodeError::BadRank(9),
            DecodeError::ShapeMismatch {
                name: name(),
                found: vec![],
                expected: vec![],
            },
            DecodeError::Duplicate(name()),
            DecodeError::PayloadLength {
                name: name(),
                found: 0,
                expected: 1,
            },
            DecodeError::BadIndices(name()),
            DecodeError::BadCodes(name()),
            DecodeError::NonFinite(name()),
            DecodeError::TrailingBytes(1),
        ];
        for error in errors {
            let reason = error.reason();
            assert!(
                crate::metrics::DROP_REASONS.contains(&reason) && reason != "other",
                "{error:?} is counted as {reason:?}"
            );
        }
    }
}

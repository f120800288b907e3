//! ggml tensor types as GGUF stores them: the type id, block geometry and which ones the CPU
//! backend can compute with. Block layouts follow ggml's `ggml-common.h`.

/// The tensor types this crate computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    /// 32 weights: f16 scale, 4 bytes of fifth bits, 16 bytes of nibbles (22 bytes).
    Q5_0,
    /// 32 weights: f16 scale, 32 × i8 (34 bytes).
    Q8_0,
    /// 256 weights: f16 scale and min-scale, 12 bytes of 6-bit sub-block scales/mins, 128 bytes
    /// of nibbles (144 bytes).
    Q4K,
    /// 256 weights: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 × i8 scales, f16 scale
    /// (210 bytes).
    Q6K,
}

/// ggml's type names by id (`ggml.c` `type_traits`), for error messages about types we refuse.
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Describes a type id for an error message: `Q4_0 (ggml type 2)` or `ggml type 77`.
pub fn describe_type_id(id: u32) -> String {
    match ggml_type_name(id) {
        Some(name) => format!("{name} (ggml type {id})"),
        None => format!("ggml type {id}"),
    }
}

/// The supported types, as listed in errors.
pub const SUPPORTED: &str = "F32, Q4_K, Q5_0, Q6_K, Q8_0";

impl GgmlType {
    /// The type for a GGUF type id, `None` when the CPU backend cannot compute with it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            6 => GgmlType::Q5_0,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::Q5_0 => 6,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 => 1,
            GgmlType::Q5_0 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::Q5_0 => 22,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of a row of `n` weights, `None` when `n` is not a whole number of blocks (or
    /// overflows).
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_and_names() {
        for (ty, id, len, bytes) in [
            (GgmlType::F32, 0, 1, 4),
            (GgmlType::Q5_0, 6, 32, 22),
            (GgmlType::Q8_0, 8, 32, 34),
            (GgmlType::Q4K, 12, 256, 144),
            (GgmlType::Q6K, 14, 256, 210),
        ] {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!(ty.id(), id);
            assert_eq!((ty.block_len(), ty.block_bytes()), (len, bytes));
        }
        assert_eq!(GgmlType::Q4K.row_bytes(896), None);
        assert_eq!(GgmlType::Q4K.row_bytes(4864), Some(19 * 144));
        assert_eq!(GgmlType::Q6K.row_bytes(512), Some(420));
        assert_eq!(GgmlType::Q5_0.row_bytes(896), Some(616));
        assert_eq!(GgmlType::from_id(2), None);
        assert_eq!(describe_type_id(2), "Q4_0 (ggml type 2)");
        assert_eq!(describe_type_id(77), "ggml type 77");
    }
}

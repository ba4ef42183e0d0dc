//! Key encodings for sled trees.
//!
//! sled orders keys by their bytes, so integers are stored big-endian: byte
//! order then equals numeric order, and a range scan over ids or due times
//! is a range scan over keys. Pure functions; no I/O.

/// A stored key has the wrong length for the encoding it is read with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key is {actual} bytes long, expected {expected}")]
pub struct KeyError {
    pub expected: usize,
    pub actual: usize,
}

/// Encodes an id or timestamp as an 8-byte, order-preserving key.
pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Decodes a key made by [`u64_key`].
pub fn decode_u64_key(key: &[u8]) -> Result<u64, KeyError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| KeyError {
        expected: 8,
        actual: key.len(),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Encodes a pair, ordered by `first` then `second` (e.g. due time, then job id).
pub fn u64_pair_key(first: u64, second: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&first.to_be_bytes());
    key[8..].copy_from_slice(&second.to_be_bytes());
    key
}

/// Decodes a key made by [`u64_pair_key`].
pub fn decode_u64_pair_key(key: &[u8]) -> Result<(u64, u64), KeyError> {
    if key.len() != 16 {
        return Err(KeyError {
            expected: 16,
            actual: key.len(),
        });
    }
    Ok((decode_u64_key(&key[..8])?, decode_u64_key(&key[8..])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn u64_keys_round_trip(n: u64) {
            prop_assert_eq!(decode_u64_key(&u64_key(n)), Ok(n));
        }

        #[test]
        fn u64_keys_sort_like_their_numbers(a: u64, b: u64) {
            prop_assert_eq!(u64_key(a).cmp(&u64_key(b)), a.cmp(&b));
        }

        #[test]
        fn pair_keys_round_trip(a: u64, b: u64) {
            prop_assert_eq!(decode_u64_pair_key(&u64_pair_key(a, b)), Ok((a, b)));
        }

        #[test]
        fn pair_keys_sort_like_their_tuples(a: (u64, u64), b: (u64, u64)) {
            prop_assert_eq!(u64_pair_key(a.0, a.1).cmp(&u64_pair_key(b.0, b.1)), a.cmp(&b));
        }

        #[test]
        fn wrong_lengths_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            prop_assert_eq!(decode_u64_key(&bytes).is_ok(), bytes.len() == 8);
            prop_assert_eq!(decode_u64_pair_key(&bytes).is_ok(), bytes.len() == 16);
        }
    }
}

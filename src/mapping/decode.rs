//! Bytes of a staff file → text: UTF-8 (with or without BOM) or
//! Shift_JIS/CP932, detected. Pure; no I/O.
//!
//! Detection order: a UTF-8 BOM means UTF-8; otherwise valid UTF-8 is
//! UTF-8 (plain ASCII is both, and reads the same); otherwise valid
//! Shift_JIS (encoding_rs's, which is Windows-31J/CP932 as Excel writes
//! it) is Shift_JIS. Anything else is refused with the line of the first
//! byte neither reads, never decoded with replacement characters: a code
//! with a `�` in it would be a wrong mapping.

use std::borrow::Cow;

use encoding_rs::SHIFT_JIS;

/// The encoding a file was read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoding {
    Utf8,
    Utf8WithBom,
    ShiftJis,
}

impl TextEncoding {
    pub fn name(self) -> &'static str {
        match self {
            Self::Utf8 => "UTF-8",
            Self::Utf8WithBom => "UTF-8 (BOM)",
            Self::ShiftJis => "Shift_JIS (CP932)",
        }
    }
}

/// Why a file's bytes are not text we read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// NUL bytes: a binary file (a spreadsheet saved as .xlsx, an image …).
    Binary,
    /// A UTF-16 byte-order mark (Excel's "Unicode text").
    Utf16,
    /// Neither UTF-8 nor Shift_JIS; the 1-based line of the first byte that
    /// does not decode in the encoding the file most looks like.
    Undecodable { line: u64, tried: TextEncoding },
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Decodes a whole file; UTF-8 is read where it is, not copied.
pub fn decode(bytes: &[u8]) -> Result<(Cow<'_, str>, TextEncoding), DecodeError> {
    if bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF") {
        return Err(DecodeError::Utf16);
    }
    if memchr_nul(bytes) {
        return Err(DecodeError::Binary);
    }
    if let Some(rest) = bytes.strip_prefix(UTF8_BOM) {
        return match std::str::from_utf8(rest) {
            Ok(text) => Ok((Cow::Borrowed(text), TextEncoding::Utf8WithBom)),
            Err(e) => Err(DecodeError::Undecodable {
                line: line_of(rest, e.valid_up_to()),
                tried: TextEncoding::Utf8WithBom,
            }),
        };
    }
    let utf8_valid_up_to = match std::str::from_utf8(bytes) {
        Ok(text) => return Ok((Cow::Borrowed(text), TextEncoding::Utf8)),
        Err(e) => e.valid_up_to(),
    };
    match decode_shift_jis(bytes) {
        Ok(text) => Ok((Cow::Owned(text), TextEncoding::ShiftJis)),
        Err(sjis_valid_up_to) => {
            // Report against the encoding that read further: that is the
            // one the file was meant to be in.
            if utf8_valid_up_to > sjis_valid_up_to {
                Err(DecodeError::Undecodable {
                    line: line_of(bytes, utf8_valid_up_to),
                    tried: TextEncoding::Utf8,
                })
            } else {
                Err(DecodeError::Undecodable {
                    line: line_of(bytes, sjis_valid_up_to),
                    tried: TextEncoding::ShiftJis,
                })
            }
        }
    }
}

/// Shift_JIS → UTF-8, or how many leading bytes decode when the rest
/// does not.
///
/// Into a buffer sized for this input, not for the worst case: encoding_rs's
/// one-call decode reserves three bytes of output per input byte, 72 MiB
/// for a 24 MiB file. An ASCII byte stays one byte; a two-byte character
/// becomes three bytes and a one-byte half-width katakana three, so two
/// more bytes per non-ASCII byte are always enough.
fn decode_shift_jis(bytes: &[u8]) -> Result<String, usize> {
    let non_ascii = bytes.iter().filter(|b| !b.is_ascii()).count();
    let mut text = String::with_capacity(bytes.len() + 2 * non_ascii + 16);
    let mut decoder = SHIFT_JIS.new_decoder_without_bom_handling();
    let mut read = 0;
    loop {
        let (result, consumed) =
            decoder.decode_to_string_without_replacement(&bytes[read..], &mut text, true);
        read += consumed;
        match result {
            encoding_rs::DecoderResult::InputEmpty => return Ok(text),
            encoding_rs::DecoderResult::Malformed(bad, after) => {
                return Err(read.saturating_sub(usize::from(bad) + usize::from(after)))
            }
            // Not reached with the room reserved above; kept correct anyway.
            encoding_rs::DecoderResult::OutputFull => text.reserve(3 * (bytes.len() - read) + 16),
        }
    }
}

fn memchr_nul(bytes: &[u8]) -> bool {
    bytes.contains(&0)
}

/// The 1-based line holding byte `offset`.
fn line_of(bytes: &[u8], offset: usize) -> u64 {
    bytes[..offset.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as u64
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoded(bytes: &[u8]) -> Result<(String, TextEncoding), DecodeError> {
        decode(bytes).map(|(text, encoding)| (text.into_owned(), encoding))
    }

    fn sjis(text: &str) -> Vec<u8> {
        let (bytes, _, unmappable) = SHIFT_JIS.encode(text);
        assert!(!unmappable);
        bytes.into_owned()
    }

    #[test]
    fn utf8_with_and_without_bom() {
        let plain = "スマレジ商品ID,外部コード\n1,A\n";
        assert_eq!(
            decoded(plain.as_bytes()),
            Ok((plain.to_owned(), TextEncoding::Utf8))
        );
        let mut bom = UTF8_BOM.to_vec();
        bom.extend_from_slice(plain.as_bytes());
        assert_eq!(
            decoded(&bom),
            Ok((plain.to_owned(), TextEncoding::Utf8WithBom))
        );
    }

    #[test]
    fn shift_jis_is_detected() {
        let text = "スマレジ商品ID,外部コード\r\n1,Ａ①髙\r\n";
        assert_eq!(
            decoded(&sjis(text)),
            Ok((text.to_owned(), TextEncoding::ShiftJis))
        );
    }

    #[test]
    fn a_truncated_shift_jis_character_names_its_line() {
        let mut bytes = sjis("スマレジ商品ID,外部コード\n1,コード\n2,");
        bytes.push(0x83); // the first byte of a two-byte character, alone
        assert_eq!(
            decoded(&bytes),
            Err(DecodeError::Undecodable {
                line: 3,
                tried: TextEncoding::ShiftJis
            })
        );
    }

    #[test]
    fn a_truncated_utf8_character_names_its_line() {
        let mut bytes = "smaregi-id,external-code\n1,コード\n".as_bytes().to_vec();
        bytes.extend_from_slice(&"2,コ".as_bytes()[..4]);
        assert_eq!(
            decoded(&bytes),
            Err(DecodeError::Undecodable {
                line: 3,
                tried: TextEncoding::Utf8
            })
        );
    }

    #[test]
    fn binary_and_utf16_are_refused() {
        assert_eq!(decoded(b"PK\x03\x04\x00\x00"), Err(DecodeError::Binary));
        assert_eq!(decoded(b"\xFF\xFEs\x00"), Err(DecodeError::Utf16));
    }

    proptest! {
        #[test]
        fn any_utf8_text_decodes_to_itself(text in "[^\u{0}\u{feff}][^\u{0}]*") {
            prop_assert_eq!(decoded(text.as_bytes()), Ok((text, TextEncoding::Utf8)));
        }

        #[test]
        fn shift_jis_text_decodes_to_itself(text in "[a-zA-Z0-9,\n\"アイウエオカナ漢字商品コード０-９]{0,40}") {
            let (decoded, encoding) = decoded(&sjis(&text)).unwrap();
            prop_assert_eq!(&decoded, &text);
            // ASCII-only text is valid UTF-8 as well, and reads the same.
            if !text.is_ascii() {
                prop_assert_eq!(encoding, TextEncoding::ShiftJis);
            }
        }

        /// The buffer sized for the input agrees with encoding_rs's own
        /// one-call decode, half-width katakana (three bytes of UTF-8 from
        /// one) included, and is never grown.
        #[test]
        fn shift_jis_decodes_like_encoding_rs_in_a_buffer_it_never_grows(
            text in "[a-z0-9,\nア漢ｱｲｳｴｵ]{0,60}"
        ) {
            let bytes = sjis(&text);
            let decoded = decode_shift_jis(&bytes).expect("valid Shift_JIS");
            prop_assert_eq!(&decoded, &text);
            let reference = SHIFT_JIS.decode_without_bom_handling_and_without_replacement(&bytes);
            prop_assert_eq!(Some(decoded.as_str()), reference.as_deref());
            let non_ascii = bytes.iter().filter(|b| !b.is_ascii()).count();
            prop_assert_eq!(decoded.capacity(), bytes.len() + 2 * non_ascii + 16);
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decoded(&bytes);
        }
    }
}

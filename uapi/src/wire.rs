//! Little-endian encoding of C structures, field by field at their `offset_of!` offsets.
//!
//! Structures are declared once with `c_struct!`: the macro emits the `#[repr(C)]` Rust
//! struct and its field-wise byte reader and writer, so the byte offsets used on the wire
//! are exactly the compiler's C layout (which the layout tests pin to the kernel headers).

use std::mem::size_of;

use crate::error::UapiError;

/// The largest structure handled here, in bytes (checked at compile time per structure).
pub const MAX_STRUCT: usize = 128;

/// A value with a fixed little-endian byte image.
pub trait Wire: Sized {
    /// Reads the value from the start of `b`, which holds at least `size_of::<Self>()` bytes.
    fn read(b: &[u8]) -> Self;
    /// Writes the value to the start of `b`, which holds at least `size_of::<Self>()` bytes.
    fn write(&self, b: &mut [u8]);

    /// The C image of the value (`sizeof` bytes, padding zero).
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; size_of::<Self>()];
        self.write(&mut out);
        out
    }
}

/// Decodes `value`'s own C image with `decode`, as if a caller had passed it: the checks
/// of a structure built in memory are those of the bytes. The image is on the stack, so
/// the check allocates nothing.
pub fn decode_image<T: Wire, R>(
    value: &T,
    decode: impl FnOnce(&[u8]) -> Result<R, UapiError>,
) -> Result<R, UapiError> {
    let mut buf = [0u8; MAX_STRUCT];
    let image = &mut buf[..size_of::<T>()];
    value.write(image);
    decode(image)
}

/// A structure decoded and validated from the bytes a caller passed, as the kernel copies
/// and checks it.
pub trait FromBytes: Sized {
    /// Decodes and validates; the error carries the errno the kernel returns.
    fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError>;
}

/// Implements [`Wire`] for a `#[repr(C)]` structure defined elsewhere (a `vfio-bindings`
/// one), field by field at its `offset_of!` offsets; fields after the list (flexible array
/// tails) take the given values.
macro_rules! wire_fields {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? } $($rest:ident : $init:expr),*) => {
        const _: () = assert!(::std::mem::size_of::<$name>() <= $crate::wire::MAX_STRUCT);

        impl $crate::wire::Wire for $name {
            fn read(b: &[u8]) -> Self {
                $name {
                    $( $field: <$ty as $crate::wire::Wire>::read(
                        &b[::std::mem::offset_of!($name, $field)..]), )*
                    $( $rest: $init, )*
                }
            }
            fn write(&self, b: &mut [u8]) {
                $( $crate::wire::Wire::write(
                    &self.$field, &mut b[::std::mem::offset_of!($name, $field)..]); )*
            }
        }
    };
}
pub(crate) use wire_fields;

macro_rules! wire_int {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn read(b: &[u8]) -> Self {
                let mut raw = [0u8; size_of::<$t>()];
                raw.copy_from_slice(&b[..size_of::<$t>()]);
                <$t>::from_le_bytes(raw)
            }
            fn write(&self, b: &mut [u8]) {
                b[..size_of::<$t>()].copy_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
wire_int!(u8, u16, u32, u64, i32);

impl<const N: usize> Wire for [u8; N] {
    fn read(b: &[u8]) -> Self {
        let mut raw = [0u8; N];
        raw.copy_from_slice(&b[..N]);
        raw
    }
    fn write(&self, b: &mut [u8]) {
        b[..N].copy_from_slice(self);
    }
}

macro_rules! wire_array {
    ($($t:ty),*) => {$(
        impl<const N: usize> Wire for [$t; N] {
            fn read(b: &[u8]) -> Self {
                std::array::from_fn(|i| <$t>::read(&b[i * size_of::<$t>()..]))
            }
            fn write(&self, b: &mut [u8]) {
                for (i, v) in self.iter().enumerate() {
                    v.write(&mut b[i * size_of::<$t>()..]);
                }
            }
        }
    )*};
}
wire_array!(u32, u64);

/// Declares a `#[repr(C)]` structure with public fields and its [`Wire`] encoding.
macro_rules! c_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        const _: () = assert!(::std::mem::size_of::<$name>() <= $crate::wire::MAX_STRUCT);

        impl $crate::wire::Wire for $name {
            fn read(b: &[u8]) -> Self {
                Self {
                    $( $field: <$ty as $crate::wire::Wire>::read(
                        &b[::std::mem::offset_of!($name, $field)..]), )*
                }
            }
            fn write(&self, b: &mut [u8]) {
                $( $crate::wire::Wire::write(
                    &self.$field, &mut b[::std::mem::offset_of!($name, $field)..]); )*
            }
        }

        impl $name {
            /// The C image of the structure (`sizeof` bytes, padding zero), on the stack:
            /// encoding an argument allocates nothing.
            pub fn to_bytes(self) -> [u8; ::std::mem::size_of::<$name>()] {
                let mut out = [0u8; ::std::mem::size_of::<$name>()];
                $crate::wire::Wire::write(&self, &mut out);
                out
            }
        }
    };
}
pub(crate) use c_struct;

/// Reads a `T` from the first `len` bytes of `bytes` into a zeroed structure, as the kernel
/// copies `len` user bytes over a zero-initialised struct. Bytes past `sizeof(T)` are ignored.
pub fn read_prefix<T: Wire>(bytes: &[u8], len: usize) -> T {
    let size = size_of::<T>();
    if len >= size && bytes.len() >= size {
        // The whole structure is there: nothing to zero-fill, no copy.
        return T::read(&bytes[..size]);
    }
    read_zero_filled(bytes, len)
}

/// [`read_prefix`] of a structure the caller gave only in part (an older caller's smaller
/// `argsz`): out of line, so that the whole-structure read stays one straight path.
#[cold]
#[inline(never)]
fn read_zero_filled<T: Wire>(bytes: &[u8], len: usize) -> T {
    let size = size_of::<T>();
    let mut buf = [0u8; MAX_STRUCT];
    let n = len.min(size).min(bytes.len());
    buf[..n].copy_from_slice(&bytes[..n]);
    T::read(&buf[..size])
}

/// Writes `value` at the start of `out`; `-EFAULT` when `out` is shorter than the structure.
pub fn write_into<T: Wire>(value: &T, out: &mut [u8], what: &'static str) -> Result<(), UapiError> {
    let size = size_of::<T>();
    let Some(dst) = out.get_mut(..size) else {
        return Err(UapiError::BufferTooShort {
            what,
            len: out.len(),
            need: size,
        });
    };
    value.write(dst);
    Ok(())
}

/// The `u32` at `offset`, or `-EFAULT` when the buffer ends before it.
pub fn peek_u32(bytes: &[u8], offset: usize, what: &'static str) -> Result<u32, UapiError> {
    match bytes.get(offset..offset + 4) {
        Some(b) => Ok(u32::read(b)),
        None => Err(UapiError::BufferTooShort {
            what,
            len: bytes.len(),
            need: offset + 4,
        }),
    }
}

/// Decodes a structure whose first field is `argsz`, the way the kernel does: read `minsz`
/// bytes (`-EFAULT` if the buffer is shorter), require `argsz >= minsz` (`-EINVAL`), then
/// read `min(argsz, sizeof)` bytes over a zeroed struct (`-EFAULT` if the buffer is shorter).
pub fn read_with_argsz<T: Wire>(
    bytes: &[u8],
    minsz: usize,
    what: &'static str,
) -> Result<T, UapiError> {
    let need = check_argsz(bytes, minsz, size_of::<T>(), what)?;
    Ok(read_prefix(bytes, need))
}

/// The checks of [`read_with_argsz`] for a structure of `size` bytes, without reading it:
/// how many bytes of it the buffer holds (`min(argsz, size)`). For a structure whose
/// embedded parts are decoded by their own `argsz`, so that only its header is read.
pub fn check_argsz(
    bytes: &[u8],
    minsz: usize,
    size: usize,
    what: &'static str,
) -> Result<usize, UapiError> {
    if bytes.len() < minsz.max(4) {
        return Err(UapiError::BufferTooShort {
            what,
            len: bytes.len(),
            need: minsz.max(4),
        });
    }
    let argsz = peek_u32(bytes, 0, what)?;
    if (argsz as usize) < minsz {
        return Err(UapiError::ArgszTooSmall {
            what,
            argsz,
            min: minsz,
        });
    }
    let need = (argsz as usize).min(size);
    if bytes.len() < need {
        return Err(UapiError::BufferTooShort {
            what,
            len: bytes.len(),
            need,
        });
    }
    Ok(need)
}

/// Checks that `flags` has no bit outside `known`.
pub fn check_flags(flags: u64, known: u64, what: &'static str) -> Result<(), UapiError> {
    if flags & !known != 0 {
        return Err(UapiError::UnknownFlags { what, flags, known });
    }
    Ok(())
}

/// Checks that a reserved byte array is zero.
pub fn check_zero(bytes: &[u8], what: &'static str) -> Result<(), UapiError> {
    if bytes.iter().any(|&b| b != 0) {
        return Err(UapiError::field(what, "reserved padding is not zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    c_struct! {
        /// A test structure with interior and trailing padding.
        pub struct Sample {
            pub a: u32,
            pub b: u64,
            pub c: u16,
        }
    }

    #[test]
    fn round_trip_and_padding() {
        let s = Sample { a: 1, b: 2, c: 3 };
        let bytes = s.to_bytes();
        assert_eq!(bytes.len(), 24);
        assert_eq!(&bytes[..4], &[1, 0, 0, 0]);
        assert_eq!(&bytes[4..8], &[0; 4]);
        assert_eq!(&bytes[8..16], &2u64.to_le_bytes());
        assert_eq!(read_prefix::<Sample>(&bytes, bytes.len()), s);
        assert_eq!(
            read_prefix::<Sample>(&bytes, 4),
            Sample { a: 1, b: 0, c: 0 }
        );
    }

    #[test]
    fn argsz_rules() {
        let mut bytes = Sample { a: 24, b: 7, c: 9 }.to_bytes();
        assert_eq!(read_with_argsz::<Sample>(&bytes, 16, "s").unwrap().b, 7);
        assert_eq!(
            read_with_argsz::<Sample>(&bytes[..8], 16, "s")
                .unwrap_err()
                .errno(),
            -libc::EFAULT
        );
        bytes[0] = 8;
        assert_eq!(
            read_with_argsz::<Sample>(&bytes, 16, "s").unwrap_err(),
            UapiError::ArgszTooSmall {
                what: "s",
                argsz: 8,
                min: 16
            }
        );
        bytes[0] = 16;
        let s = read_with_argsz::<Sample>(&bytes, 16, "s").unwrap();
        assert_eq!((s.b, s.c), (7, 0), "bytes past argsz are not read");
        bytes[0] = 200;
        assert_eq!(read_with_argsz::<Sample>(&bytes, 16, "s").unwrap().c, 9);
    }
}

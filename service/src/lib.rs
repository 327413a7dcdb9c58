//! The host as a service: `vsva host` serves uAPI files to VMMs in other processes over a
//! UNIX socket, and a VMM reaches it through [`RemoteFile`](client::RemoteFile), the same fd-shaped
//! [`vsva_uapi::file::UapiFile`] the in-process host implements.
//!
//! - [`protocol`]: frames, messages, limits (docs/protocol.md is the specification).
//! - [`socket`]: `SOCK_SEQPACKET` frames with `SCM_RIGHTS` file descriptors.
//! - [`ring`]: the shared-memory call ring a client may offer with `HELLO`.
//! - [`kind`]: the file kinds a connection can open: a VFIO type1 container, or an
//!   iommufd ([`iommufd`], with the table of the ioctls it serves and their pointers).
//! - [`fault`]: an iommufd fault queue served to the client on a socket pair.
//! - [`server`]: the host, one thread per connection.
//! - [`process`]: a `vsva host` child process, started, probed and stopped.
//! - [`load`]: `vsva load`, a host and VM processes under load and chaos.

pub mod client;
pub mod fault;
pub mod iommufd;
pub mod kind;
pub mod load;
pub mod process;
pub mod protocol;
pub mod ring;
pub mod server;
pub mod socket;
pub mod thread;

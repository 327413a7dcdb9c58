//! The VMM side of vsva: the guest-visible virtual VT-d (vIOMMU).

//! stormwall's connections to Redis.
//!
//! * [`conn`]: a connection that sends stormwall's own commands and decodes their replies
//!   (the shield's batches, handshakes, the readiness probe), opened *as* a client identity;
//! * [`mux`]: one Redis connection shared by many clients, their commands written together
//!   and the replies handed back in order;
//! * [`pool`]: the shared connections per identity and the pre-connected spares, with
//!   reconnection — the only part that knows where Redis is, so a Cluster or Sentinel router
//!   sits above it rather than inside it;
//! * [`probe`]: whether Redis answers, and whether it requires authentication;
//! * [`target`]: where Redis is now — the configured address, or the master Sentinel names
//!   ([`sentinel`] follows it) — and which connections were opened before it moved.

mod conn;
pub mod mux;
pub mod pool;
mod probe;
pub mod sentinel;
mod target;

pub use conn::Conn;
pub use probe::Probe;
pub use target::Target;

use std::fmt;
use std::io;

use bytes::Bytes;

/// Who a connection acts as: the credentials and database a client session established.
/// Invalidations are grouped by it, and executed on connections opened with it.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    /// `None`: never authenticated (the default user, if Redis allows that without a password).
    pub user: Option<Bytes>,
    pub password: Option<Bytes>,
    pub db: i64,
}

impl Identity {
    /// The commands that make a new connection act as this identity: `AUTH` (if it has
    /// credentials) and `SELECT` (if not database 0).
    pub fn commands(&self) -> Vec<Vec<Bytes>> {
        let mut commands = Vec::new();
        if let Some(password) = &self.password {
            let mut auth = vec![Bytes::from_static(b"AUTH")];
            auth.extend(self.user.clone());
            auth.push(password.clone());
            commands.push(auth);
        }
        if self.db != 0 {
            commands.push(vec![
                Bytes::from_static(b"SELECT"),
                Bytes::from(self.db.to_string()),
            ]);
        }
        commands
    }
}

/// Never prints the password: identities end up in logs and panic messages.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

/// Why a connection could not be used.
#[derive(Debug)]
pub enum ConnError {
    /// Connecting, writing or reading failed (transient: worth retrying).
    Io(io::Error),
    /// Redis refused to let this connection act as the identity (`AUTH`/`SELECT` refused, or
    /// `NOAUTH`) with this error: retrying won't help.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let who = Identity {
            user: Some(Bytes::from_static(b"alice")),
            password: Some(Bytes::from_static(b"hunter2")),
            db: 3,
        };
        let shown = format!("{who:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("alice") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}

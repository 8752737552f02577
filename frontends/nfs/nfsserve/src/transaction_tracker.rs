use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

/// `TransactionTracker` tracks the state of transactions to detect retransmissions.
///
/// tidepool fork: only calls still running are tracked (a retransmission of one is dropped:
/// the first will answer). Upstream also kept every finished call for `retention_period` and
/// dropped a retransmission of it unanswered, so a client whose reply was lost waited that
/// long (60 s) before the call ran again; and under load the map held every call of the last
/// minute (over a million entries at 20 k calls/s), swept under its lock. A retransmission of
/// a finished call now runs again, as on a server without a reply cache.
pub struct TransactionTracker {
    transactions: Mutex<HashSet<(u32, String)>>,
}

impl TransactionTracker {
    pub fn new(_retention_period: Duration) -> Self {
        Self {
            transactions: Mutex::new(HashSet::new()),
        }
    }

    /// Checks if the transaction is a retransmission of a call still running.
    /// If it's a new transaction, it is marked as in progress.
    ///
    /// Returns `true` if the transaction is a retransmission, `false` otherwise.
    pub fn is_retransmission(&self, xid: u32, client_addr: &str) -> bool {
        let key = (xid, client_addr.to_string());
        let mut transactions = self.transactions.lock().expect("unable to unlock transactions mutex");
        !transactions.insert(key)
    }

    /// Marks the transaction as processed.
    pub fn mark_processed(&self, xid: u32, client_addr: &str) {
        let key = (xid, client_addr.to_string());
        let mut transactions = self.transactions.lock().expect("unable to unlock transactions mutex");
        transactions.remove(&key);
    }
}

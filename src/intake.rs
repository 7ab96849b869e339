//! Intake: one inbound message through parse → thread → decide → compose →
//! store, inside the store's transaction. The SMTP listener and `crmgate
//! deliver` both end here.

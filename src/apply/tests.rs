//! A copy composed at send time is the copy ingest planned: for each kind
//! of copy, the draft built in the writer's transaction (from the entry as
//! written) and the one the relay rebuilds from the stored plan (with the
//! entry read back) compose to the same bytes.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::compose::{self, Draft};
use crate::config::Config;
use crate::desk;
use crate::helpdesk::{EntryKind, Envelope};
use crate::intake::{self, Arrival, Runtime};
use crate::parse::{Attachment, Mailbox};
use crate::store::{self, outbox, tickets, Db};

thread_local! {
    /// The drafts ingest planned on this thread, by Message-ID.
    static INGEST_DRAFTS: RefCell<BTreeMap<String, Draft>> = const { RefCell::new(BTreeMap::new()) };
}

/// Called by [`super::planned`] for every copy queued.
pub(super) fn record_ingest_draft(draft: Draft) {
    INGEST_DRAFTS.with(|d| d.borrow_mut().insert(draft.message_id.clone(), draft));
}

const JANE: &str = "jane.doe@example.org";
const BOB: &str = "bob.agent@example.org";
const FORMER: &str = "old.agent@example.org";

struct Desk {
    _dir: tempfile::TempDir,
    conn: Db,
    rt: Runtime,
}

impl Desk {
    /// The rules' configuration with Bob on every new work-notes list, and
    /// old.agent@ an agent once, removed since.
    fn new() -> Desk {
        let dir = tempfile::tempdir().unwrap();
        let conn = Db::Sqlite(store::open(&dir.path().join("crmgate.db")).unwrap());
        let mut config = Config::from_toml(include_str!("../../fixtures/rules.toml"), "test")
            .expect("fixtures/rules.toml");
        config.agents[1].default_notes_list = true;
        let mut with_former = config.agents.clone();
        with_former.push(crate::config::Agent {
            email: FORMER.into(),
            ..config.agents[1].clone()
        });
        tickets::sync_agents(&conn, &with_former, 1).unwrap();
        tickets::sync_agents(&conn, &config.agents, 2).unwrap();
        let mut rt = Runtime::new(Arc::new(config)).unwrap();
        rt.load_former_agents(&conn).unwrap();
        assert!(rt.scrub.addresses.iter().any(|a| a == FORMER));
        Desk {
            _dir: dir,
            conn,
            rt,
        }
    }

    /// One message in over SMTP, from a trusted peer when an agent sends.
    fn mail(&mut self, from: &str, rcpt: &str, message: &str) {
        let trusted = from == JANE || from == BOB;
        let envelope = Envelope {
            peer: if trusted {
                [10, 0, 0, 5].into()
            } else {
                [192, 0, 2, 1].into()
            },
            helo: "client".into(),
            mail_from: Some(from.into()),
            rcpt_to: vec![rcpt.into()],
        };
        let raw = message.replace('\n', "\r\n").into_bytes();
        let outcome = intake::deliver_once(&mut self.conn, &self.rt, &Arrival::new(envelope, raw))
            .expect("stored");
        assert_eq!(outcome.verdict, crate::smtp::Verdict::Stored, "{outcome:?}");
    }

    fn in_transaction<T>(&mut self, f: impl FnOnce(&Db, &Runtime) -> T) -> T {
        let tx = self.conn.transaction().unwrap();
        let out = f(&tx, &self.rt);
        tx.commit().unwrap();
        out
    }

    /// Every queued row composed as the relay does, beside the bytes of
    /// the draft ingest planned for it, with the row's kind.
    fn copies(&self) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        let rows = outbox::due(&self.conn, i64::MAX, 1000).unwrap();
        let (rows, unsendable) = crate::relay::composed(&self.conn, rows).unwrap();
        assert!(unsendable.is_empty(), "{unsendable:?}");
        rows.into_iter()
            .map(|row| {
                let planned = INGEST_DRAFTS
                    .with(|d| d.borrow().get(&row.message_id).cloned())
                    .unwrap_or_else(|| panic!("no draft planned for {}", row.message_id));
                (row.kind, compose::compose(&planned).unwrap(), row.message)
            })
            .collect()
    }
}

fn number(conn: &Db) -> String {
    tickets::list(conn, None).unwrap()[0].number.clone()
}

#[test]
fn every_kind_of_copy_composed_at_send_time_is_the_one_planned_at_ingest() {
    let mut desk = Desk::new();
    // A new ticket: the receipt to Alice, the agents' copies. Her text
    // quotes a former agent, to be scrubbed from what non-agents get.
    desk.mail(
        "alice@u.example",
        "support@example.org",
        "From: Alice Martin <alice@u.example>\nTo: support@example.org\nCc: carol@u.example\n\
         Subject: Imprimante en panne\nMessage-ID: <open-1@u.example>\n\n\
         Elle ne marche plus.\nOld Agent <old.agent@example.org> disait de la redemarrer.\n",
    );
    let number = number(&desk.conn);
    // Her reply, in text and HTML, without Carol in Cc: the comment goes
    // to the watch list.
    desk.mail(
        "alice@u.example",
        "support@example.org",
        &format!(
            "From: Alice Martin <alice@u.example>\nTo: support@example.org\n\
             Subject: Re: [{number}] Imprimante en panne\nMessage-ID: <reply-1@u.example>\n\
             In-Reply-To: <open-1@u.example>\nMIME-Version: 1.0\n\
             Content-Type: multipart/alternative; boundary=\"b\"\n\n\
             --b\nContent-Type: text/plain; charset=utf-8\n\nToujours rien, Jane Doe <jane.doe@example.org> le sait.\n\
             --b\nContent-Type: text/html; charset=utf-8\n\n\
             <html><body><p>Toujours rien, <a href=\"mailto:jane.doe@example.org\">Jane</a>.</p></body></html>\n\
             --b--\n"
        ),
    );
    // A work note by Jane, to Bob.
    desk.mail(
        JANE,
        "support-notes@example.org",
        &format!(
            "From: Jane Doe <jane.doe@example.org>\nTo: support-notes@example.org\n\
             Subject: [{number}] note\nMessage-ID: <note-1@example.org>\n\nLe toner est vide.\n"
        ),
    );
    // A comment by Jane from the command line, the e-mail function with an
    // attachment, a failure notice, and the closure.
    let jane = Mailbox::new(Some("Jane Doe"), JANE);
    let rt_number = number.clone();
    desk.in_transaction(|conn, rt| {
        desk::publish(
            conn,
            rt,
            &rt_number,
            &jane,
            EntryKind::Comment,
            "Je passe demain.",
        )
        .unwrap();
        let attachments = [Attachment {
            filename: "devis.txt".into(),
            content_type: "text/plain".into(),
            data: b"Devis pour jane.doe@example.org\n".to_vec(),
            inline: false,
        }];
        desk::email(
            conn,
            rt,
            &desk::Email {
                number: &rt_number,
                agent: &jane,
                to: &["vendor@v.example".to_string()],
                cc: &[],
                subject: "Toner",
                text: "Bonjour,\nmerci de nous envoyer un toner.\n",
                attachments: &attachments,
            },
        )
        .unwrap();
        let view = tickets::view(conn, tickets::require(conn, &rt_number).unwrap()).unwrap();
        assert!(super::failure_notice(
            conn,
            rt,
            &view,
            "public_copy",
            "carol@u.example",
            "550 5.1.1 unknown",
            store::now()
        )
        .unwrap());
        desk::resolve(conn, rt, &rt_number, Some(&jane)).unwrap();
    });

    let copies = desk.copies();
    let kinds: std::collections::BTreeSet<&str> =
        copies.iter().map(|(k, _, _)| k.as_str()).collect();
    for kind in [
        "receipt",
        "agent_copy",
        "public_copy",
        "work_note",
        "email",
        "failure_notice",
        "closure",
    ] {
        assert!(kinds.contains(kind), "no {kind} copy among {kinds:?}");
    }
    for (kind, planned, sent) in &copies {
        assert_eq!(
            String::from_utf8_lossy(planned),
            String::from_utf8_lossy(sent),
            "the {kind} copy"
        );
        assert_eq!(planned, sent, "the {kind} copy");
        let text = String::from_utf8_lossy(sent).to_lowercase();
        if !matches!(kind.as_str(), "agent_copy" | "work_note" | "failure_notice") {
            assert!(!text.contains(FORMER), "{kind}: {text}");
            assert!(!text.contains(JANE), "{kind}: {text}");
        }
    }
    let email = &copies.iter().find(|(k, _, _)| k == "email").unwrap().2;
    let email = String::from_utf8_lossy(email);
    assert!(
        email.contains("devis.txt") && email.contains("multipart/mixed"),
        "{email}"
    );
    assert!(
        copies.iter().any(|(kind, _, sent)| kind == "public_copy"
            && String::from_utf8_lossy(sent).contains("multipart/alternative")),
        "Alice's reply in text and HTML"
    );
}

#[test]
fn a_notice_of_no_ticket_composed_at_send_time_is_the_one_planned_at_ingest() {
    let mut desk = Desk::new();
    let jane = Mailbox::new(Some("Jane Doe"), JANE);
    desk.in_transaction(|conn, rt| {
        let notice = super::AgentNotice {
            agent: &jane,
            template: "quick_help",
            subject: "Aide",
            line: "",
            reason: &crate::templates::Phrase::default(),
        };
        super::queue_agent_notice(conn, rt, None, &notice, store::now()).unwrap();
    });
    let copies = desk.copies();
    assert_eq!(copies.len(), 1);
    let (kind, planned, sent) = &copies[0];
    assert_eq!(kind, "quick_action_notice");
    assert_eq!(planned, sent);
}

#[test]
fn a_copy_is_composed_alike_twice_and_a_planned_row_stores_no_bytes() {
    let mut desk = Desk::new();
    desk.mail(
        "alice@u.example",
        "support@example.org",
        "From: alice@u.example\nTo: support@example.org\nSubject: Ecran\n\
         Message-ID: <open-2@u.example>\n\nNoir.\n",
    );
    let first = desk.copies();
    let second = desk.copies();
    assert!(!first.is_empty());
    assert_eq!(first, second);
    let stored: Vec<(Option<i64>, Option<String>)> = desk
        .conn
        .query_all(
            "SELECT length(m.message), o.plan
             FROM outbox AS o LEFT JOIN outbox_messages AS m ON m.outbox_id = o.id",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(stored.len(), first.len());
    for (bytes, plan) in stored {
        assert_eq!(bytes, None, "no bytes: the plan is in the outbox row");
        let plan = plan.expect("a plan");
        assert!(plan.len() < 2048, "{} bytes: {plan}", plan.len());
    }
    // Her plain text is kept once: in the raw message, which her entry names.
    let entries: Vec<(String, Option<i64>)> = desk
        .conn
        .query_all(
            "SELECT body, raw_body_len FROM entries WHERE raw_id IS NOT NULL",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!((entries[0].0.as_str(), entries[0].1.is_some()), ("", true));
}

//! crmgate's own SPF, DKIM and DMARC check and its DKIM signatures,
//! against a real DNS server on 127.0.0.1 (tests/common/dns.rs) that
//! publishes the test domains' records.

mod common;

use std::net::IpAddr;
use std::path::Path;

use common::dns::Dns;
use common::gateway::{Gateway, INTERNAL, JANE, PUBLIC};
use crmgate::auth::{Dkim, DkimSigner, SignError, Spf, VerifyError};

const HOST: &str = "mx.crm.test";

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/dkim")
        .join(name)
}

fn signer(key: &str, domains: &[&str]) -> DkimSigner {
    DkimSigner::load(&fixture(key), "sel", domains).unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

const WORK_NOTE: &str = "From: Jane Doe <jane@example.org>\r\n\
To: support-notes@crm.test\r\n\
Subject: Re: [TKT0000001] printer\r\n\
Date: Tue, 1 Dec 2026 10:00:00 +0000\r\n\
Message-ID: <note-1@example.org>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
The toner is ordered.\r\n";

/// example.org: SPF for 127.0.0.1, a DMARC record, the RSA key under
/// `sel`; provider.test: SPF for 127.0.0.1 as well (a shared provider);
/// other.test: the same key (a signature for another domain).
async fn published(signer: &DkimSigner) -> Dns {
    let dns = Dns::start().await;
    dns.txt("example.org", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("_dmarc.example.org", "v=DMARC1; p=reject");
    dns.txt(&signer.record_name("example.org"), &signer.record());
    dns.txt("provider.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt(&signer.record_name("other.test"), &signer.record());
    dns
}

#[tokio::test]
async fn a_valid_aligned_signature_passes_from_a_peer_spf_does_not_allow() {
    let signer = signer("rsa2048.pem", &["example.org"]);
    let dns = published(&signer).await;
    let signed = signer
        .sign(WORK_NOTE.as_bytes(), "jane@example.org")
        .unwrap();
    let result = dns
        .verifier(HOST)
        .check(
            &signed,
            ip("192.0.2.9"),
            "mail.provider.test",
            Some("jane@example.org"),
            "example.org",
        )
        .await
        .unwrap();
    assert_eq!(result.dkim, Dkim::Pass(vec!["example.org".into()]));
    assert_eq!(result.spf, Spf::Fail);
    assert!(result.dmarc_pass());
    let header = result.header(HOST);
    assert!(
        header.starts_with("Authentication-Results: mx.crm.test; spf=fail"),
        "{header}"
    );
    assert!(
        header.contains("dkim=pass header.d=example.org; dmarc=pass"),
        "{header}"
    );
}

#[tokio::test]
async fn a_broken_body_hash_another_domain_or_no_signature_fail_the_test() {
    let signer = signer("rsa2048.pem", &["example.org"]);
    let dns = published(&signer).await;
    let verifier = dns.verifier(HOST);
    let peer = ip("192.0.2.9");

    let signed = signer
        .sign(WORK_NOTE.as_bytes(), "jane@example.org")
        .unwrap();
    let tampered = String::from_utf8(signed)
        .unwrap()
        .replace("The toner is ordered.", "Wire 5,000 EUR today.");
    let result = verifier
        .check(
            tampered.as_bytes(),
            peer,
            "x.test",
            Some("jane@example.org"),
            "example.org",
        )
        .await
        .unwrap();
    assert_eq!(result.dkim, Dkim::Fail);
    assert!(!result.dmarc_pass());

    let other = signer
        .sign(WORK_NOTE.as_bytes(), "someone@other.test")
        .unwrap();
    let result = verifier
        .check(
            &other,
            peer,
            "x.test",
            Some("jane@example.org"),
            "example.org",
        )
        .await
        .unwrap();
    assert_eq!(result.dkim, Dkim::Pass(vec!["other.test".into()]));
    assert!(!result.dmarc_pass());

    let result = verifier
        .check(
            WORK_NOTE.as_bytes(),
            peer,
            "x.test",
            Some("jane@example.org"),
            "example.org",
        )
        .await
        .unwrap();
    assert_eq!(result.dkim, Dkim::None);
    assert!(!result.dmarc_pass());
}

#[tokio::test]
async fn spf_passes_count_only_aligned_and_helo_stands_in_for_the_null_sender() {
    let signer = signer("rsa2048.pem", &["example.org"]);
    let dns = published(&signer).await;
    let verifier = dns.verifier(HOST);
    let peer = ip("127.0.0.1");

    let aligned = verifier
        .check(
            WORK_NOTE.as_bytes(),
            peer,
            "x.test",
            Some("bounce@example.org"),
            "example.org",
        )
        .await
        .unwrap();
    assert_eq!(
        (aligned.spf, aligned.spf_domain.as_str()),
        (Spf::Pass, "example.org")
    );
    assert!(aligned.dmarc_pass());

    let shared = verifier
        .check(
            WORK_NOTE.as_bytes(),
            peer,
            "x.test",
            Some("tenant@provider.test"),
            "example.org",
        )
        .await
        .unwrap();
    assert_eq!(shared.spf, Spf::Pass);
    assert!(
        !shared.dmarc_pass(),
        "the provider's SPF is no proof for example.org"
    );

    let by_helo = verifier
        .check(
            WORK_NOTE.as_bytes(),
            peer,
            "example.org",
            None,
            "example.org",
        )
        .await
        .unwrap();
    assert!(by_helo.spf_by_helo);
    assert_eq!(by_helo.spf, Spf::Pass);
    assert!(by_helo.header(HOST).contains("smtp.helo=example.org"));

    let (spf, domain, _) = verifier
        .spf(ip("192.0.2.9"), "x.test", Some("a@example.org"))
        .await;
    assert_eq!((spf, domain.as_str()), (Spf::Fail, "example.org"));
}

#[tokio::test]
async fn a_dns_server_that_does_not_answer_is_an_error_not_a_verdict() {
    let signer = signer("rsa2048.pem", &["example.org"]);
    let mut dns = published(&signer).await;
    let verifier = dns.verifier(HOST);
    dns.stop();
    let signed = signer
        .sign(WORK_NOTE.as_bytes(), "jane@example.org")
        .unwrap();
    let result = verifier
        .check(
            &signed,
            ip("192.0.2.9"),
            "x.test",
            Some("jane@example.org"),
            "example.org",
        )
        .await;
    assert!(matches!(result, Err(VerifyError::Dns(_))), "{result:?}");
}

#[tokio::test]
async fn ed25519_and_pkcs1_keys_sign_and_verify() {
    for key in ["ed25519.pem", "rsa2048-pkcs1.pem"] {
        let signer = signer(key, &["example.org"]);
        let dns = published(&signer).await;
        let signed = signer
            .sign(WORK_NOTE.as_bytes(), "jane@example.org")
            .unwrap();
        let text = String::from_utf8(signed.clone()).unwrap();
        assert!(text.starts_with("DKIM-Signature:"), "{key}");
        assert!(text.contains("c=relaxed/relaxed"), "{key}: {text}");
        let result = dns
            .verifier(HOST)
            .check(&signed, ip("192.0.2.9"), "x.test", None, "example.org")
            .await
            .unwrap();
        assert_eq!(result.dkim, Dkim::Pass(vec!["example.org".into()]), "{key}");
    }
    assert!(signer("ed25519.pem", &[])
        .record()
        .starts_with("v=DKIM1; k=ed25519; p="));
    assert!(signer("rsa2048.pem", &[])
        .record()
        .starts_with("v=DKIM1; k=rsa; p=MIIBIjAN"));
}

#[test]
fn a_weak_unreadable_or_keyless_file_is_refused_by_name() {
    let weak = DkimSigner::load(&fixture("rsa1024.pem"), "sel", &[]).unwrap_err();
    assert!(matches!(weak, SignError::Weak { bits: 1024, .. }), "{weak}");
    let missing = DkimSigner::load(&fixture("none.pem"), "sel", &[]).unwrap_err();
    assert!(matches!(missing, SignError::Read { .. }), "{missing}");
    let keyless = DkimSigner::from_pem(b"hello\n", "x.pem", "sel", &[]).unwrap_err();
    assert!(matches!(keyless, SignError::NoKey(_)), "{keyless}");
}

/// The record `crmgate dkim-record` prints, as (name, TXT text).
fn printed_records(out: &str) -> Vec<(String, String)> {
    out.lines()
        .map(|line| {
            let name = line.split_whitespace().next().unwrap().to_string();
            let text: String = line.split('"').skip(1).step_by(2).collect();
            (name, text)
        })
        .collect()
}

#[tokio::test]
async fn every_message_crmgate_sends_verifies_against_the_record_it_prints() {
    let key = fixture("rsa2048.pem");
    let tail = format!(
        "[auth]\ndkim_selector = \"sel\"\ndkim_key_file = {:?}\n",
        key.display().to_string()
    );
    let g = Gateway::start_with("", &tail).await;
    let (code, out, err) = g.cli(&["dkim-record"]);
    assert_eq!(code, 0, "{err}");
    let records = printed_records(&out);
    assert_eq!(records.len(), 1, "{out}");
    assert_eq!(records[0].0, "sel._domainkey.example.org.");
    assert!(records[0].1.starts_with("v=DKIM1; k=rsa; p="), "{out}");

    let dns = Dns::start().await;
    dns.txt(&records[0].0, &records[0].1);
    let verifier = dns.verifier(HOST);

    // A receipt, a public copy and a work note: three kinds of mail.
    let number = g.open_ticket().await;
    let reply = g
        .send(
            JANE,
            &[INTERNAL],
            &format!(
                "From: Jane Doe <{JANE}>\nTo: {INTERNAL}\nSubject: Re: [{number}] Imprimante\n\n\
                 Toner commandé, é à ü.\n"
            ),
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let sent = g.settle().await;
    assert!(sent.len() >= 3, "{}", sent.len());
    for message in &sent {
        let text = String::from_utf8_lossy(&message.data);
        assert!(text.starts_with("DKIM-Signature:"), "{text}");
        assert!(text.contains("c=relaxed/relaxed"));
        let result = verifier
            .check(
                &message.data,
                ip("192.0.2.9"),
                "x.test",
                None,
                "example.org",
            )
            .await
            .unwrap();
        assert_eq!(
            result.dkim,
            Dkim::Pass(vec!["example.org".into()]),
            "{text}"
        );
    }
    let signed = String::from_utf8_lossy(&sent[0].data).to_string();
    let h = signed
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .replace("\r\n\t", " ")
        .replace("\r\n ", " ");
    let list = h
        .split("h=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_ascii_lowercase();
    for name in [
        "from",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "content-type",
    ] {
        assert!(
            list.split(':').any(|n| n.trim() == name),
            "{name} not in h={list}"
        );
    }
}

#[tokio::test]
async fn check_config_names_auth_dkim_key_file_for_a_weak_or_unreadable_key() {
    for key in [fixture("rsa1024.pem"), fixture("absent.pem")] {
        let tail = format!(
            "[auth]\ndkim_selector = \"sel\"\ndkim_key_file = {:?}\n",
            key.display().to_string()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crmgate.toml");
        std::fs::write(&path, tail).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crmgate"))
            .arg("--config")
            .arg(&path)
            .arg("check-config")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("auth.dkim_key_file"), "{stderr}");
    }
}

// ---------------------------------------------------------------------------
// The daemon believes an agent on its own check (SPEC, Security 3).
// ---------------------------------------------------------------------------

/// example.org publishes SPF for another server (so our peer, 127.0.0.1,
/// fails it), a DMARC record and the signing key; bounces.example.org is
/// sent from 127.0.0.1 (an aligned SPF pass), as is provider.test (a
/// shared provider: an unaligned pass); forged.test allows no server.
async fn agents_domain(signer: &DkimSigner) -> Dns {
    let dns = Dns::start().await;
    dns.txt("example.org", "v=spf1 ip4:192.0.2.1 -all");
    dns.txt("_dmarc.example.org", "v=DMARC1; p=reject");
    dns.txt(&signer.record_name("example.org"), &signer.record());
    dns.txt("bounces.example.org", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt("provider.test", "v=spf1 ip4:127.0.0.1 -all");
    dns.txt(&signer.record_name("other.test"), &signer.record());
    dns.txt("forged.test", "v=spf1 -all");
    dns
}

/// A gateway that trusts no peer (the agents write from a provider) and
/// asks `dns`; `authserv_id` is crmgate's own hostname, so that a forged
/// header under that name would be believed if it were not dropped.
async fn untrusting_gateway(dns: &Dns) -> Gateway {
    Gateway::start_with(
        "trusted_relays = []\nauthserv_id = \"crm.example.org\"\n",
        &format!(
            "[auth]\ndns_servers = [\"{}\"]\ndns_timeout_seconds = 1\n",
            dns.addr()
        ),
    )
    .await
}

fn work_note(number: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "{extra_headers}From: Jane Doe <{JANE}>\r\nTo: {INTERNAL}\r\nSubject: Re: [{number}] Imprimante\r\n\
         Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{}@example.org>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n",
        body.len()
    )
}

fn work_notes(g: &Gateway, number: &str) -> usize {
    g.show(number)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "work_note")
        .count()
}

fn stored_raw(g: &Gateway) -> Vec<String> {
    let conn = rusqlite::Connection::open(g.dir.path().join("state/crmgate.db")).unwrap();
    let mut statement = conn
        .prepare("SELECT data FROM raw_messages ORDER BY id")
        .unwrap();
    statement
        .query_map([], |row| row.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|data| String::from_utf8_lossy(&data.unwrap()).into_owned())
        .collect()
}

#[tokio::test]
async fn an_agent_is_believed_on_an_aligned_signature_or_spf_pass_and_nothing_less() {
    let signer = signer("rsa2048.pem", &["example.org"]);
    let dns = agents_domain(&signer).await;
    let g = untrusting_gateway(&dns).await;
    let number = g.open_ticket().await;

    // A valid signature of the agent's domain, from a peer SPF does not allow.
    let note = work_note(&number, "", "Toner commandé.");
    let signed = String::from_utf8(signer.sign(note.as_bytes(), JANE).unwrap()).unwrap();
    let reply = g.send(JANE, &[INTERNAL], &signed).await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(work_notes(&g, &number), 1);
    let stamped = stored_raw(&g).pop().unwrap();
    assert!(
        stamped.starts_with(
            "Authentication-Results: crm.example.org; spf=fail smtp.mailfrom=example.org; \
             dkim=pass header.d=example.org; dmarc=pass header.from=example.org\r\n"
        ),
        "{stamped}"
    );

    // A broken body hash, a signature of another domain, an SPF pass of a
    // shared provider, no signature at all: an outsider's work note.
    let tampered = signed.replace("Toner commandé.", "Virez 5000 EUR.");
    let other = String::from_utf8(
        signer
            .sign(
                work_note(&number, "", "Autre domaine.").as_bytes(),
                "x@other.test",
            )
            .unwrap(),
    )
    .unwrap();
    for (sender, message) in [
        (JANE, tampered),
        (JANE, other),
        (
            "tenant@provider.test",
            work_note(&number, "", "Par le fournisseur."),
        ),
        (JANE, work_note(&number, "", "Sans signature.")),
    ] {
        let reply = g.send(sender, &[INTERNAL], &message).await;
        assert!(reply.starts_with("550 5.7.1"), "{sender}: {reply}");
    }
    assert_eq!(work_notes(&g, &number), 1);

    // An SPF pass alone, aligned (the agent's domain sends its bounces
    // from a subdomain): believed.
    let reply = g
        .send(
            "jane@bounces.example.org",
            &[INTERNAL],
            &work_note(&number, "", "Par SPF."),
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(work_notes(&g, &number), 2);
}

#[tokio::test]
async fn a_forged_authentication_results_under_our_name_is_dropped_and_believes_nobody() {
    let signer = signer("rsa2048.pem", &["example.org"]);
    let dns = agents_domain(&signer).await;
    let g = untrusting_gateway(&dns).await;
    let number = g.open_ticket().await;
    let forged = work_note(
        &number,
        "Authentication-Results: crm.example.org; dmarc=pass header.from=example.org;\r\n \
         dkim=pass header.d=example.org\r\n",
        "Croyez-moi.",
    );
    let reply = g.send(JANE, &[INTERNAL], &forged).await;
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    assert_eq!(work_notes(&g, &number), 0);
    // What is kept of it (the refusal is quarantined) carries our verdict
    // only, not the forged one.
    let kept: Vec<String> = stored_raw(&g)
        .into_iter()
        .filter(|raw| raw.contains("Croyez-moi"))
        .collect();
    assert_eq!(kept.len(), 1);
    assert!(
        kept[0].starts_with("Authentication-Results: crm.example.org; spf=fail"),
        "{}",
        kept[0]
    );
    assert!(!kept[0].contains("dmarc=pass"), "{}", kept[0]);
}

#[tokio::test]
async fn dns_down_during_an_agents_check_is_451_4_4_3_and_nothing_is_stored() {
    let signer = signer("rsa2048.pem", &["example.org"]);
    let mut dns = agents_domain(&signer).await;
    let g = untrusting_gateway(&dns).await;
    let number = g.open_ticket().await;
    dns.stop();
    let before = stored_raw(&g).len();
    let quarantined = g
        .json(&["quarantine", "list", "--json"])
        .as_array()
        .unwrap()
        .len();
    let note = work_note(&number, "", "Pendant la panne.");
    let signed = String::from_utf8(signer.sign(note.as_bytes(), JANE).unwrap()).unwrap();
    let reply = g.send(JANE, &[INTERNAL], &signed).await;
    assert!(reply.starts_with("451 4.4.3"), "{reply}");
    assert_eq!(stored_raw(&g).len(), before);
    assert_eq!(
        g.json(&["quarantine", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        quarantined
    );
    assert_eq!(work_notes(&g, &number), 0);
}

#[tokio::test]
async fn a_servfail_on_the_spf_record_of_an_unsigned_agents_mail_is_451_4_4_3() {
    let signer = signer("rsa2048.pem", &["example.org"]);
    let dns = agents_domain(&signer).await;
    let g = untrusting_gateway(&dns).await;
    let number = g.open_ticket().await;
    dns.set_servfail(true);
    // No signature: only SPF could vouch for Jane, and its record is unknown.
    let note = work_note(&number, "", "Pendant le SERVFAIL.");
    let reply = g.send(JANE, &[INTERNAL], &note).await;
    assert!(reply.starts_with("451 4.4.3"), "{reply}");
    assert_eq!(work_notes(&g, &number), 0);
}

#[tokio::test]
async fn requesters_mail_costs_no_dns_query_and_a_forged_sender_gets_no_receipt() {
    let signer = signer("rsa2048.pem", &["example.org"]);
    let dns = agents_domain(&signer).await;
    let g = untrusting_gateway(&dns).await;

    // A new requester: the SPF of its envelope sender is asked, once.
    let number = g.open_ticket().await;
    assert_eq!(dns.asked(), ["u.example"]);
    // A reply on the ticket: no receipt is possible, nothing is asked.
    let reply = g
        .send(
            "alice@u.example",
            &[PUBLIC],
            &format!("From: alice@u.example\r\nTo: {PUBLIC}\r\nSubject: Re: [{number}] Imprimante\r\n\r\nMerci\r\n"),
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(dns.asked(), ["u.example"]);

    // A sender whose domain's SPF fails: a ticket, but no receipt (backscatter).
    let reply = g
        .send(
            "victim@forged.test",
            &[PUBLIC],
            &format!("From: victim@forged.test\r\nTo: {PUBLIC}\r\nSubject: Gagnez\r\n\r\nSpam\r\n"),
        )
        .await;
    assert!(reply.starts_with("250"), "{reply}");
    let sent = g.settle().await;
    assert!(!sent
        .iter()
        .any(|m| m.rcpt_to.iter().any(|r| r == "victim@forged.test")));
    assert!(sent
        .iter()
        .any(|m| m.rcpt_to.iter().any(|r| r == "alice@u.example")));
    let list = g.json(&["ticket", "list", "--json"]);
    let forged = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["subject"] == "Gagnez")
        .unwrap()["number"]
        .as_str()
        .unwrap()
        .to_string();
    let entries = g.show(&forged)["entries"].clone();
    let system: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "system")
        .map(|e| e["body"].as_str().unwrap())
        .collect();
    assert!(
        system
            .iter()
            .any(|b| b.contains("SPF") && b.contains("forged.test")),
        "{entries}"
    );
    assert!(!entries
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "receipt"));
}

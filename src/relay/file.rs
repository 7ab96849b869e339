//! The file relay (`file://DIR`): each message becomes `DIR/<outbox id>.eml`,
//! so a fresh install, or a test, sees what crmgate sends without a mail
//! server. The envelope goes beside it in `<outbox id>.json`, in the shape
//! of lettre's file transport (`reverse_path`, `forward_path`).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `.eml` files into one directory, created on first use.
#[derive(Clone)]
pub(crate) struct FileRelay {
    dir: PathBuf,
}

impl FileRelay {
    pub(crate) fn new(dir: PathBuf) -> FileRelay {
        FileRelay { dir }
    }

    /// The path of a row's message: the outbox id, zero-padded so that a
    /// directory listing sorts in sending order.
    pub(crate) fn eml_path(dir: &Path, outbox_id: i64) -> PathBuf {
        dir.join(format!("{outbox_id:010}.eml"))
    }

    /// Write one message and its envelope. Blocking: call it off the async
    /// worker threads.
    ///
    /// Each file is written under a temporary name, synced, then renamed,
    /// so a reader never sees half a message and a crash leaves no `.eml`
    /// for a row that is still queued. The `.json` is written first: an
    /// `.eml` is the sign that both are complete.
    ///
    /// # Errors
    /// The directory cannot be created or a file cannot be written.
    pub(crate) fn write(
        &self,
        outbox_id: i64,
        mail_from: &str,
        recipients: &[String],
        message: &[u8],
    ) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let envelope = serde_json::json!({
            "reverse_path": mail_from,
            "forward_path": recipients,
        });
        let eml = Self::eml_path(&self.dir, outbox_id);
        write_atomically(&eml.with_extension("json"), envelope.to_string().as_bytes())?;
        write_atomically(&eml, message)?;
        Ok(eml)
    }
}

fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_message_and_its_envelope_under_the_outbox_id() {
        let dir = tempfile::tempdir().unwrap();
        let relay = FileRelay::new(dir.path().join("sent/deeper"));
        let path = relay
            .write(
                42,
                "support+bounce-42-x@h",
                &["a@x".into(), "b@x".into()],
                b"Subject: s\r\n\r\nhi\r\n",
            )
            .unwrap();
        assert_eq!(path.file_name().unwrap(), "0000000042.eml");
        assert_eq!(std::fs::read(&path).unwrap(), b"Subject: s\r\n\r\nhi\r\n");
        let envelope: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.with_extension("json")).unwrap()).unwrap();
        assert_eq!(envelope["reverse_path"], "support+bounce-42-x@h");
        assert_eq!(envelope["forward_path"], serde_json::json!(["a@x", "b@x"]));
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }
}

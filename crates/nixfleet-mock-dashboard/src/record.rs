//! `--record FILE`: a JSON-lines journal of everything agents send.
//!
//! Lines are built by the caller (under the state lock, so the file's order
//! is the order the mock saw things) and handed to a dedicated writer thread
//! over an unbounded channel: recording never blocks a connection task, and
//! the file is flushed whenever the writer has caught up, so a reader polling
//! the file sees a line within milliseconds of the frame.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

pub struct Recorder {
    tx: mpsc::Sender<String>,
}

pub struct RecorderThread(JoinHandle<()>);

impl Recorder {
    /// Opens `path` for appending (creating it) and starts the writer thread.
    pub fn open(path: &Path) -> std::io::Result<(Recorder, RecorderThread)> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::channel::<String>();
        let display = path.display().to_string();
        let handle = std::thread::Builder::new()
            .name("record-writer".into())
            .spawn(move || write_loop(file, rx, &display))?;
        Ok((Recorder { tx }, RecorderThread(handle)))
    }

    /// Queues one line (must end with `\n`). Never blocks.
    pub fn write(&self, line: String) {
        // The writer only goes away at shutdown; losing a line then is fine.
        let _ = self.tx.send(line);
    }
}

impl RecorderThread {
    /// Waits for the writer to drain and flush; call after every `Recorder`
    /// has been dropped.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

fn write_loop(file: File, rx: mpsc::Receiver<String>, path: &str) {
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    let mut failed = false;
    let report = |error: std::io::Error, failed: &mut bool| {
        if !*failed {
            tracing::error!(path, %error, "writing the record file failed; further lines may be lost");
            *failed = true;
        }
    };
    while let Ok(line) = rx.recv() {
        if let Err(e) = out.write_all(line.as_bytes()) {
            report(e, &mut failed);
        }
        // Drain whatever queued up meanwhile, then flush once.
        while let Ok(line) = rx.try_recv() {
            if let Err(e) = out.write_all(line.as_bytes()) {
                report(e, &mut failed);
            }
        }
        if let Err(e) = out.flush() {
            report(e, &mut failed);
        }
    }
    if let Err(e) = out.flush() {
        report(e, &mut failed);
    }
}

//! The stand-in `nixos-rebuild` the agent runs: a script that runs this
//! benchmark's own binary as the output generator, and the generator's
//! speed on its own (so that the flood measures the agent, not it).

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

/// Writes the stand-in `nixos-rebuild`: it runs this binary with `args`.
/// The agent passes children a whitelisted environment only, so the path
/// is written into the script.
pub fn stand_in(bin_dir: &Path, bench_exe: &Path, args: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let exe = bench_exe
        .to_str()
        .ok_or("the benchmark's path is not UTF-8")?;
    if exe.contains('\'') {
        return Err("the benchmark's path contains a quote".into());
    }
    let path = bin_dir.join("nixos-rebuild");
    let script = format!("#!/bin/sh\nexec '{exe}' {args}\n");
    // Written aside and renamed, so a run never sees a half-written script.
    let temp = bin_dir.join(".nixos-rebuild.new");
    std::fs::write(&temp, script).map_err(|e| format!("stand-in: {e}"))?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("stand-in: {e}"))?;
    std::fs::rename(&temp, &path).map_err(|e| format!("stand-in: {e}"))
}

/// Runs the flood generator into a pipe this process drains; lines/s.
pub fn calibrate_generator(bench_exe: &Path, lines: u64) -> Result<f64, String> {
    use std::io::Read;
    let started = Instant::now();
    let mut child = std::process::Command::new(bench_exe)
        .args(["__flood", &lines.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the generator: {e}"))?;
    let mut pipe = child.stdout.take().ok_or("no pipe")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut count = 0u64;
    loop {
        let n = pipe
            .read(&mut buf)
            .map_err(|e| format!("reading the generator: {e}"))?;
        if n == 0 {
            break;
        }
        count += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
    }
    let _ = child.wait();
    let elapsed = started.elapsed();
    if count != lines {
        return Err(format!("the generator wrote {count} lines, not {lines}"));
    }
    Ok(lines as f64 / elapsed.as_secs_f64())
}

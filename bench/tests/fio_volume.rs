//! `fio-volume` on a short run: every job through the real `fio` on a file,
//! parsed, and reported (the full benchmark, on block devices, is
//! `bench/volume-fio.sh`, not in CI).

use std::process::Command;

const FIO_VOLUME: &str = env!("CARGO_BIN_EXE_fio-volume");

#[test]
fn every_job_runs_through_fio_and_reaches_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("device");
    std::fs::write(&device, vec![0u8; 16 << 20]).unwrap();
    let results = dir.path().join("results");
    // A process standing in for the device's server, so CPU is recorded.
    let mut server = Command::new("sleep").arg("60").spawn().unwrap();
    let run = Command::new(FIO_VOLUME)
        .args([
            "run",
            "--label",
            "attach",
            "--runtime",
            "1",
            "--ramp",
            "0",
            "--size",
            "16M",
        ])
        .arg("--device")
        .arg(&device)
        .arg("--results")
        .arg(&results)
        .arg("--pid")
        .arg(server.id().to_string())
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for job in tessera_bench::fio::JOBS {
        let json = results.join(format!("attach.{}.json", job.name));
        let measured = tessera_bench::fio::parse(&std::fs::read_to_string(&json).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", json.display()));
        assert!(
            measured.iops > 0.0 && measured.p99_us >= measured.p50_us,
            "{job:?}: {measured:?}"
        );
        assert!(results.join(format!("attach.{}.cpu", job.name)).exists());
    }

    let doc = dir.path().join("BENCHMARKS.md");
    std::fs::write(&doc, "# Benchmarks\n\nkept\n").unwrap();
    for _ in 0..2 {
        let report = Command::new(FIO_VOLUME)
            .args(["report", "--preamble", "## Volume I/O\n"])
            .arg("--results")
            .arg(&results)
            .arg("--write")
            .arg(&doc)
            .output()
            .unwrap();
        assert!(
            report.status.success(),
            "{}",
            String::from_utf8_lossy(&report.stderr)
        );
    }
    let text = std::fs::read_to_string(&doc).unwrap();
    // Written twice, present once; what was there before stays.
    assert_eq!(text.matches("## Volume I/O").count(), 1, "{text}");
    assert!(text.starts_with("# Benchmarks\n\nkept\n"), "{text}");
    for job in tessera_bench::fio::JOBS {
        assert!(text.contains(&format!("(`{}`)", job.name)), "{text}");
    }
    assert!(
        text.contains("| (b) attach path alone (FUSE + loop, local file) |"),
        "{text}"
    );

    // A job name that does not exist is refused before anything runs.
    let bad = Command::new(FIO_VOLUME)
        .args([
            "run",
            "--label",
            "x",
            "--job",
            "nope",
            "--device",
            "/dev/null",
            "--results",
        ])
        .arg(&results)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no job named \"nope\""));
}

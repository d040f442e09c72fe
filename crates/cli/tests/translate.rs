//! The translator (`serval proxy`, `serval expose`) end to end on loopback with the real
//! binary: plain TCP client → proxy → router → expose → plain TCP backend, both written here
//! with std sockets so that each test controls exactly when each side reads, writes, closes or
//! resets. The programs of the real world (nginx, curl, redis…) are in `programs.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{Guard, echo_backend, router, serval, spawn_ready, wait_line};

/// A router, an expose of `name` to `backend`, and a proxy in front of it.
struct Chain {
    proxy: String,
    proxy_err: mpsc::Receiver<String>,
    expose_err: mpsc::Receiver<String>,
    _guards: Vec<Guard>,
}

fn chain(name: &str, backend: &str) -> Chain {
    chain_with(name, backend, &[])
}

/// [`chain`] with `proxy_flags` added to the proxy's command line.
fn chain_with(name: &str, backend: &str, proxy_flags: &[&str]) -> Chain {
    let (router, raddr) = router(&[]);
    let (expose, _, _, expose_err) = support::expose(name, backend, &raddr, &[]);
    let (proxy, paddr, proxy_err) = support::proxy(name, &raddr, proxy_flags);
    Chain {
        proxy: paddr,
        proxy_err,
        expose_err,
        _guards: vec![proxy, expose, router],
    }
}

fn backend() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

fn client(proxy: &str) -> TcpStream {
    let c = TcpStream::connect(proxy).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c
}

/// Accepts one connection within 20 s.
fn accept(l: &TcpListener) -> TcpStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("no connection reached the backend: {e}"),
        }
    }
}

/// A TCP reset instead of a FIN when `s` is dropped.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// Reads until EOF; panics on any error (a reset included).
fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("read to a clean end");
    v
}

/// Reads until the connection ends; returns the bytes and whether it ended with an error
/// (a reset) rather than a clean EOF.
fn read_until_end(s: &mut TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    let mut v = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (v, None),
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) => return (v, Some(e.kind())),
        }
    }
}

#[test]
fn bytes_and_half_close_pass_both_ways() {
    let (l, baddr) = backend();
    let c = chain("half.translate.test", &baddr);
    let request = pattern(3 << 20, 1);
    let response = pattern(5 << 20, 2);

    let req = request.clone();
    let resp = response.clone();
    let server = std::thread::spawn(move || {
        let mut s = accept(&l);
        // The request ends with the client's FIN, carried as a Serval FIN, then a TCP FIN.
        let got = read_to_eof(&mut s);
        assert!(
            got == req,
            "backend got {} bytes, not the request",
            got.len()
        );
        // Our direction is still open after theirs closed: answer, then close.
        s.write_all(&resp).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });

    let mut s = client(&c.proxy);
    s.write_all(&request).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let got = read_to_eof(&mut s);
    server.join().unwrap();
    assert!(
        got == response,
        "client got {} bytes, not the response",
        got.len()
    );
}

#[test]
fn a_backend_reset_reaches_the_client_as_a_reset() {
    let (l, baddr) = backend();
    let c = chain("rst1.translate.test", &baddr);
    let server = std::thread::spawn(move || {
        let mut s = accept(&l);
        s.write_all(b"partial answer").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        reset(s);
    });
    let mut s = client(&c.proxy);
    s.write_all(b"hello").unwrap();
    let (got, end) = read_until_end(&mut s);
    server.join().unwrap();
    assert_eq!(got, b"partial answer");
    assert_eq!(
        end,
        Some(ErrorKind::ConnectionReset),
        "the client must see a reset, not a clean end"
    );
    wait_line(&c.proxy_err, "the proxy's line", |l| {
        l.contains("Serval side") && l.contains("reset")
    });
}

#[test]
fn a_client_reset_reaches_the_backend_as_a_reset() {
    let (l, baddr) = backend();
    let c = chain("rst2.translate.test", &baddr);
    let mut s = client(&c.proxy);
    s.write_all(b"some request").unwrap();
    let mut b = accept(&l);
    let mut buf = [0u8; 12];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"some request");
    reset(s);
    let (rest, end) = read_until_end(&mut b);
    assert!(rest.is_empty());
    assert_eq!(
        end,
        Some(ErrorKind::ConnectionReset),
        "the backend must see a reset, not a clean end"
    );
    wait_line(&c.expose_err, "the expose's line", |l| {
        l.contains("Serval side") && l.contains("reset")
    });
}

#[test]
fn a_backend_that_does_not_read_holds_the_client_back() {
    let (l, baddr) = backend();
    let c = chain("slow.translate.test", &baddr);
    // Far more than every buffer on the way (two TCP connections' socket buffers, the Serval
    // flow-control window and the translators' fixed buffers); an unbounded relay would take
    // it all at once.
    const TOTAL: usize = 256 << 20;
    let mut s = client(&c.proxy);
    let mut w = s.try_clone().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let writer = std::thread::spawn(move || {
        let chunk = pattern(1 << 20, 7);
        for _ in 0..TOTAL / chunk.len() {
            w.write_all(&chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
        done_tx.send(()).unwrap();
    });
    let mut b = accept(&l);
    assert!(
        done_rx.recv_timeout(Duration::from_secs(3)).is_err(),
        "the client wrote {TOTAL} bytes while the backend read nothing: something buffers without bound"
    );
    // Now read everything: the client is released and every byte arrives in order.
    let expect = pattern(1 << 20, 7);
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..TOTAL / buf.len() {
        b.read_exact(&mut buf).unwrap();
        assert!(buf == expect, "chunk {i} differs");
    }
    assert_eq!(b.read(&mut buf).unwrap(), 0, "EOF after the last chunk");
    done_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    writer.join().unwrap();
    drop(b);
    assert!(read_to_eof(&mut s).is_empty());
}

#[test]
fn many_concurrent_connections_each_get_their_own_bytes() {
    let (l, baddr) = backend();
    let c = chain("many.translate.test", &baddr);
    const N: usize = 64;
    echo_backend(l);
    let clients: Vec<_> = (0..N)
        .map(|i| {
            let proxy = c.proxy.clone();
            std::thread::spawn(move || {
                let data = pattern(200_000 + i * 1000, i as u8);
                let mut s = client(&proxy);
                let mut w = s.try_clone().unwrap();
                let d = data.clone();
                let t = std::thread::spawn(move || {
                    w.write_all(&d).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let got = read_to_eof(&mut s);
                t.join().unwrap();
                got == data
            })
        })
        .collect();
    let ok = clients
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|&ok| ok)
        .count();
    assert_eq!(ok, N, "every connection echoed its own bytes");
}

#[test]
fn a_refusing_backend_resets_the_client_and_expose_goes_on() {
    // A port nobody listens on: bind, note it, close.
    let closed = backend().1;
    let c = chain("refused.translate.test", &closed);
    for _ in 0..2 {
        let start = Instant::now();
        let mut s = client(&c.proxy);
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let (got, end) = read_until_end(&mut s);
        assert!(got.is_empty());
        assert_eq!(end, Some(ErrorKind::ConnectionReset));
        assert!(start.elapsed() < Duration::from_secs(10), "prompt");
        wait_line(&c.expose_err, "the expose's line", |l| {
            l.contains(&format!("backend {closed}")) && l.contains("refused")
        });
    }
}

#[test]
fn a_name_with_no_instance_resets_the_client_and_proxy_goes_on() {
    let (router, raddr) = router(&[]);
    let (proxy, paddr, proxy_err) = spawn_ready({
        let mut c = serval();
        c.args(["proxy", "nobody.translate.test", "--listen", "127.0.0.1:0"])
            .args(["--router", &raddr]);
        c
    });
    for _ in 0..2 {
        let mut s = client(&paddr);
        let (got, end) = read_until_end(&mut s);
        assert!(got.is_empty());
        assert_eq!(end, Some(ErrorKind::ConnectionReset));
        wait_line(&proxy_err, "the proxy's line", |l| {
            l.contains("no route to service nobody.translate.test")
        });
    }
    drop((proxy, router));
}

#[test]
fn a_proxy_port_in_use_is_one_line_and_exit_1() {
    let (_held, addr) = backend();
    let out = serval()
        .args(["proxy", "x.test", "--listen", &addr, "--via", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("error: cannot listen on {addr}")),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no READY line");
}

#[test]
fn bad_translator_flags_are_one_line_and_exit_2() {
    for args in [
        &["expose", "x.test", "--to", "nocolon"][..],
        &["expose", "bad..name", "--to", "127.0.0.1:80"],
        &["proxy", "x.test", "--listen", "127.0.0.1:0"],
        &[
            "proxy",
            "x.test",
            "--listen",
            "nope",
            "--via",
            "127.0.0.1:1",
        ],
        &["expose", "x.test", "--to", "127.0.0.1:80", "--weight", "0"],
    ] {
        let out = serval().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn beyond_max_connections_a_connection_waits_for_a_free_slot() {
    let (l, baddr) = backend();
    let c = chain_with("limit.translate.test", &baddr, &["--max-connections", "1"]);
    echo_backend(l);
    let mut first = client(&c.proxy);
    first.write_all(b"one").unwrap();
    let mut buf = [0u8; 3];
    first.read_exact(&mut buf).unwrap();
    // The second is accepted by the kernel but not served while the first holds the slot.
    let mut second = client(&c.proxy);
    second.write_all(b"two").unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let e = second.read(&mut buf).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );
    // Closing the first frees the slot: the second is served.
    first.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_eof(&mut first).is_empty());
    second
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    second.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two");
}

/// Waits (at most `limit`) for `child` to exit; its status, or `None` if it did not.
fn wait_exit(child: &mut Guard, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_proxy_stopped_with_sigterm_refuses_new_connections_and_drains_open_ones() {
    let (l, baddr) = backend();
    let (_router, raddr) = router(&[]);
    let (_expose, _, _, _expose_err) = support::expose("drain.translate.test", &baddr, &raddr, &[]);
    let (mut proxy, paddr, perr) =
        support::proxy("drain.translate.test", &raddr, &["--drain", "30"]);

    // A connection open at the signal, in the middle of its exchange.
    let mut s = client(&paddr);
    s.write_all(b"before").unwrap();
    let mut b = accept(&l);
    let mut buf = [0u8; 6];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"before");

    let st = std::process::Command::new("kill")
        .args(["-TERM", &proxy.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let line = wait_line(&perr, "the proxy's drain line", |l| {
        l.contains("proxy stopping")
    });
    assert!(line.contains("waiting for 1 open connection(s)"), "{line}");
    // No new connections: the listening socket is closed.
    let refused = TcpStream::connect(&paddr).map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    assert!(proxy.0.try_wait().unwrap().is_none(), "the proxy quit");

    // The open connection goes on, both ways, after the signal: 1 MiB each way, then FINs.
    let up = pattern(1 << 20, 3);
    let down = pattern(1 << 20, 4);
    let (up2, down2) = (up.clone(), down.clone());
    let server = std::thread::spawn(move || {
        let mut w = b.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&down2).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let got = read_to_eof(&mut b);
        writer.join().unwrap();
        assert!(
            got == up2,
            "backend got {} bytes, not the upload",
            got.len()
        );
    });
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&up).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let got = read_to_eof(&mut s);
    writer.join().unwrap();
    server.join().unwrap();
    assert!(
        got == down,
        "client got {} bytes, not the download",
        got.len()
    );

    // Then the proxy exits, cleanly, having let the connection finish.
    let st = wait_exit(&mut proxy, Duration::from_secs(20)).expect("the proxy never exited");
    assert!(st.success(), "proxy exit {st}");
    let rest = support::drain(&perr);
    assert!(
        rest.iter().any(|l| l.contains("every connection finished")),
        "{rest:#?}"
    );
}

//! Loopback tests of the libp2p transport: port 0, no timing assertions.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use libp2p::{PeerId, identity::Keypair};
use nnmesh_client::transport::{self, Inbound, RequestError};
use nnmesh_protocol::{
    codec::{self, CodecError, WIRE_VERSION},
    message::{ErrorKind, Request, Response, WireError},
};
use tokio::sync::mpsc;

/// A deterministic identity from a seed.
fn key(seed: u8) -> Keypair {
    Keypair::ed25519_from_bytes([seed; 32]).expect("valid ed25519 secret")
}

fn config(seed: u8) -> transport::Config {
    let mut cfg = transport::Config::new(key(seed));
    cfg.request_timeout = Duration::from_secs(30);
    cfg
}

/// Answers every inbound request with `f(request)`.
fn serve(mut inbound: mpsc::Receiver<Inbound>, f: impl Fn(Vec<u8>) -> Vec<u8> + Send + 'static) {
    tokio::spawn(async move {
        while let Some(req) = inbound.recv().await {
            let _ = req.reply.send(f(req.request));
        }
    });
}

/// Echoes the request back.
fn echo(inbound: mpsc::Receiver<Inbound>) {
    serve(inbound, |bytes| bytes);
}

async fn start(cfg: transport::Config) -> Result<(transport::Endpoint, mpsc::Receiver<Inbound>)> {
    Ok(transport::Endpoint::start(cfg).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_round_trip() -> Result<()> {
    let (server, inbound) = start(config(1)).await?;
    serve(inbound, |bytes| {
        let request: Request = codec::decode(&bytes).expect("client sends valid requests");
        assert_eq!(request, Request::Info);
        codec::encode(&Response::Tokens(vec![vec![1, 2, 3]]))
    });
    let (client, _inbound) = start(config(2)).await?;

    let addrs = server.listen_addrs().await;
    assert!(!addrs.is_empty());
    assert!(
        addrs
            .iter()
            .all(|a| a.to_string().ends_with(&server.peer_id().to_string())),
        "{addrs:?}"
    );
    assert!(
        addrs.iter().all(|a| !a.to_string().contains("/tcp/0/")),
        "port 0 resolved: {addrs:?}"
    );

    let answer = client
        .request(
            server.peer_id(),
            addrs.clone(),
            codec::encode(&Request::Info),
        )
        .await?;
    let response: Response = codec::decode(&answer)?;
    assert_eq!(response, Response::Tokens(vec![vec![1, 2, 3]]));

    // Explicit dial reports the remote's peer id, with or without /p2p/.
    assert_eq!(client.dial(addrs[0].clone()).await?, server.peer_id());
    let mut bare = addrs[0].clone();
    bare.pop();
    assert_eq!(client.dial(bare).await?, server.peer_id());

    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_request_and_response() -> Result<()> {
    const SIZE: usize = 16 << 20;
    let (server, inbound) = start(config(3)).await?;
    // Answer a big request with a big, different response.
    serve(inbound, |bytes| {
        assert_eq!(bytes.len(), SIZE);
        bytes.iter().map(|b| b.wrapping_add(1)).collect()
    });
    let (client, _inbound) = start(config(4)).await?;
    let request: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let addrs = server.listen_addrs().await;

    // Warm the connection so the timing covers the transfer only.
    let _ = client
        .request(server.peer_id(), addrs.clone(), request.clone())
        .await?;
    let started = Instant::now();
    let response = client
        .request(server.peer_id(), addrs, request.clone())
        .await?;
    let elapsed = started.elapsed();

    assert_eq!(response.len(), SIZE);
    assert!(
        response
            .iter()
            .zip(&request)
            .all(|(r, q)| *r == q.wrapping_add(1))
    );
    println!(
        "16 MiB request + 16 MiB response over loopback: {:.1} ms, {:.0} MB/s (both directions)",
        elapsed.as_secs_f64() * 1e3,
        (2 * SIZE) as f64 / elapsed.as_secs_f64() / 1e6
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_fail_clearly_and_the_receiver_keeps_serving() -> Result<()> {
    const LIMIT: usize = 1 << 20;
    let mut small = config(5);
    small.max_message = LIMIT;
    let (server, inbound) = start(small).await?;
    // Replies with `n` bytes when asked with the 8-byte LE `n`, else echoes.
    serve(inbound, |bytes| {
        match <[u8; 8]>::try_from(bytes.as_slice()) {
            Ok(n) => vec![7; u64::from_le_bytes(n) as usize],
            Err(_) => bytes,
        }
    });
    let addrs = server.listen_addrs().await;

    // 1. Over our own limit: refused before anything is sent.
    let mut small_client = config(6);
    small_client.max_message = LIMIT;
    let (limited, _i1) = start(small_client).await?;
    match limited
        .request(server.peer_id(), addrs.clone(), vec![0; LIMIT + 1])
        .await
    {
        Err(RequestError::TooLarge {
            what: "request",
            len,
            max: LIMIT,
        }) if len == (LIMIT + 1) as u64 => {}
        other => bail!("expected a request TooLarge, got {other:?}"),
    }

    // 2. Over the receiver's limit: the receiver resets the stream; the sender
    //    gets an error (not a hang, not a truncated delivery).
    let (big, _i2) = start(config(7)).await?;
    let err = big
        .request(server.peer_id(), addrs.clone(), vec![0; 2 * LIMIT])
        .await
        .expect_err("the receiver refuses a frame over its limit");
    println!("sender saw: {err}");
    assert!(!matches!(err, RequestError::Timeout { .. }), "{err:?}");

    // ... and the receiver keeps serving, on the same and on other connections.
    let ok = big
        .request(server.peer_id(), addrs.clone(), b"still there".to_vec())
        .await?;
    assert_eq!(ok, b"still there");
    let ok = limited
        .request(server.peer_id(), addrs.clone(), b"me too".to_vec())
        .await?;
    assert_eq!(ok, b"me too");

    // 3. A response over the responder's own limit becomes a TooLarge error answer.
    let answer = big
        .request(
            server.peer_id(),
            addrs.clone(),
            ((2 * LIMIT) as u64).to_le_bytes().to_vec(),
        )
        .await?;
    match codec::decode::<Response>(&answer)? {
        Response::Error(WireError {
            kind: ErrorKind::TooLarge,
            ..
        }) => {}
        other => bail!("expected a TooLarge answer, got {other:?}"),
    }

    // 4. A response over the requester's limit fails on the requester.
    let (big_server, big_inbound) = start(config(8)).await?;
    serve(big_inbound, |_| vec![1; 2 * LIMIT]);
    match limited
        .request(
            big_server.peer_id(),
            big_server.listen_addrs().await,
            b"?".to_vec(),
        )
        .await
    {
        Err(RequestError::TooLarge {
            what: "response",
            max: LIMIT,
            ..
        }) => {}
        other => bail!("expected a response TooLarge, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_are_found_through_the_dht() -> Result<()> {
    const KEY: &[u8] = b"nnmesh/stages/v1";
    let (first, first_inbound) = start(config(10)).await?;
    echo(first_inbound);
    let first_addr = first.listen_addrs().await;

    let mut providers = Vec::new();
    for seed in [11, 12] {
        let mut cfg = config(seed);
        cfg.bootstrap = first_addr.clone();
        cfg.provide = Some(KEY.to_vec());
        let (node, inbound) = start(cfg).await?;
        echo(inbound);
        providers.push(node);
    }
    let mut expected: Vec<PeerId> = providers.iter().map(transport::Endpoint::peer_id).collect();
    expected.sort();

    let mut cfg = config(13);
    cfg.bootstrap = first_addr;
    let (client, _inbound) = start(cfg).await?;

    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let found = client.providers(KEY.to_vec()).await?;
        if found == expected || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(found, expected);

    // A found provider is reachable by peer id alone (kad knows its addresses).
    let ok = client.request(found[0], Vec::new(), b"hi".to_vec()).await?;
    assert_eq!(ok, b"hi");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_inbound_queue_answers_overloaded() -> Result<()> {
    let mut cfg = config(20);
    cfg.inbound_capacity = 1;
    let (server, mut inbound) = start(cfg).await?;
    let (client, _i) = start(config(21)).await?;
    let addrs = server.listen_addrs().await;

    // Nobody reads the queue yet: of two concurrent requests, one is queued
    // and the other is answered Overloaded at once.
    let send = |body: &'static [u8]| {
        let (client, peer, addrs) = (client.clone(), server.peer_id(), addrs.clone());
        tokio::spawn(async move { client.request(peer, addrs, body.to_vec()).await })
    };
    let mut a = send(b"a");
    let mut b = send(b"b");
    let (first, other) = tokio::select! {
        r = &mut a => (r??, b),
        r = &mut b => (r??, a),
    };
    match codec::decode::<Response>(&first)? {
        Response::Error(WireError {
            kind: ErrorKind::Overloaded,
            ..
        }) => {}
        r => bail!("expected Overloaded, got {r:?}"),
    }

    // The queued one is still served once the application catches up.
    let queued = inbound.recv().await.context("queued request")?;
    let body = queued.request.clone();
    queued
        .reply
        .send(body.clone())
        .expect("transport waits for the reply");
    assert_eq!(other.await??, body);

    // A dropped reply becomes an Internal error answer, not a hang.
    let pending = send(b"c");
    drop(inbound.recv().await.context("third request")?);
    match codec::decode::<Response>(&pending.await??)? {
        Response::Error(WireError {
            kind: ErrorKind::Internal,
            ..
        }) => {}
        r => bail!("expected Internal, got {r:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_delivered_raw_and_decoding_reports_it() -> Result<()> {
    let (server, inbound) = start(config(30)).await?;
    // The application's job: decode, and answer what it cannot decode.
    serve(inbound, |bytes| {
        let error = match codec::decode::<Request>(&bytes) {
            Ok(_) => return codec::encode(&Response::Ack),
            Err(CodecError::Version { found, supported }) => WireError::new(
                ErrorKind::Version,
                format!("version {found}, this node speaks {supported}"),
            ),
            Err(e) => WireError::new(ErrorKind::Malformed, e.to_string()),
        };
        codec::encode(&Response::Error(error))
    });
    let (client, _i) = start(config(31)).await?;
    let addrs = server.listen_addrs().await;

    let garbage = [&codec::WIRE_VERSION.to_le_bytes()[..], &[0xff; 6], &[0x01]].concat();
    assert!(matches!(
        codec::decode::<Request>(&garbage),
        Err(CodecError::Malformed(_))
    ));
    let answer = client
        .request(server.peer_id(), addrs.clone(), garbage)
        .await?;
    assert!(matches!(
        codec::decode::<Response>(&answer)?,
        Response::Error(WireError {
            kind: ErrorKind::Malformed,
            ..
        })
    ));

    let mut future = codec::encode(&Request::Info);
    future[..2].copy_from_slice(&(WIRE_VERSION + 1).to_le_bytes());
    assert_eq!(
        codec::decode::<Request>(&future),
        Err(CodecError::Version {
            found: WIRE_VERSION + 1,
            supported: WIRE_VERSION
        })
    );
    let answer = client
        .request(server.peer_id(), addrs.clone(), future)
        .await?;
    assert!(matches!(
        codec::decode::<Response>(&answer)?,
        Response::Error(WireError {
            kind: ErrorKind::Version,
            ..
        })
    ));

    let answer = client
        .request(server.peer_id(), addrs, codec::encode(&Request::Info))
        .await?;
    assert_eq!(codec::decode::<Response>(&answer)?, Response::Ack);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_requests_cleanly() -> Result<()> {
    let (server, inbound) = start(config(40)).await?;
    echo(inbound);
    let (client, _i) = start(config(41)).await?;
    let addrs = server.listen_addrs().await;
    client
        .request(server.peer_id(), addrs.clone(), b"x".to_vec())
        .await?;

    server.shutdown().await;
    server.shutdown().await; // idempotent
    assert!(server.listen_addrs().await.is_empty());
    match client
        .request(server.peer_id(), addrs.clone(), b"x".to_vec())
        .await
    {
        Err(
            RequestError::DialFailure { .. }
            | RequestError::ConnectionClosed { .. }
            | RequestError::Io { .. },
        ) => {}
        other => bail!("expected a delivery failure, got {other:?}"),
    }

    client.shutdown().await;
    assert!(matches!(
        client.request(server.peer_id(), addrs, b"x".to_vec()).await,
        Err(RequestError::Shutdown)
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_mesh_admits_only_peers_with_its_key() -> Result<()> {
    let psk = |b: u8| libp2p::pnet::PreSharedKey::new([b; 32]);
    let with_key = |seed: u8, key: Option<libp2p::pnet::PreSharedKey>| {
        let mut cfg = config(seed);
        cfg.psk = key;
        cfg
    };
    let (server, inbound) = start(with_key(40, Some(psk(7)))).await?;
    echo(inbound);
    let addr = server.listen_addrs().await[0].clone();
    let (member, _i) = start(with_key(41, Some(psk(7)))).await?;
    assert_eq!(member.dial(addr.clone()).await?, server.peer_id());
    let answer = member
        .request(server.peer_id(), vec![addr.clone()], b"hi".to_vec())
        .await?;
    assert_eq!(answer, b"hi");
    for (seed, key) in [(42, None), (43, Some(psk(8)))] {
        let (outsider, _i) = start(with_key(seed, key)).await?;
        let dial =
            tokio::time::timeout(Duration::from_secs(20), outsider.dial(addr.clone())).await?;
        assert!(dial.is_err(), "key {key:?}: dial should fail, got {dial:?}");
        let request = outsider
            .request(server.peer_id(), vec![addr.clone()], b"hi".to_vec())
            .await;
        assert!(request.is_err(), "key {key:?}: {request:?}");
    }
    Ok(())
}

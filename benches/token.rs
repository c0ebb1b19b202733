//! Token validation and minting per algorithm.
//!
//! `cargo bench --bench token` reports validations (and mints) per second on one
//! core: criterion runs each on the calling thread. `check` is the full path a
//! console endpoint takes: size cap, header, key by kid, pinned algorithm,
//! signature, claims, console type and allow-list.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_main};
use porthole::hypervisor::{AllowList, BackendNetwork};
use porthole::token::claims::{ConsoleClaim, ConsoleType};
use porthole::token::signing::{KeyKind, MintRequest, Signer, generate};
use porthole::token::{KeySource, TokenValidator, ValidationPolicy, unix_now};

fn setup(kind: KeyKind, dir: &std::path::Path) -> (Signer, TokenValidator) {
    let kid = format!("{kind:?}").to_lowercase();
    let key = generate(kind, &kid).unwrap();
    let source = match &key.public_pem {
        Some(pem) => {
            let path = dir.join(format!("{kid}.pub.pem"));
            std::fs::write(&path, pem).unwrap();
            KeySource::PublicKeyPem {
                kid: Some(kid.clone()),
                algorithm: key.algorithm,
                path,
            }
        }
        None => {
            let path = dir.join(format!("{kid}.secret"));
            std::fs::write(&path, key.private.expose()).unwrap();
            KeySource::SharedSecret {
                kid: Some(kid.clone()),
                path,
            }
        }
    };
    let signer = match kind {
        KeyKind::Hs256 => Signer::from_secret(key.private.expose().as_bytes(), Some(kid)),
        _ => Signer::from_private_pem(key.private.expose().as_bytes(), Some(kid)).unwrap(),
    };
    let policy = ValidationPolicy {
        issuers: vec!["porthole".into()],
        audiences: vec!["porthole".into()],
        leeway_secs: 5,
        max_ttl_secs: 600,
        max_token_bytes: 4096,
    };
    let allow = Arc::new(AllowList::new(vec![BackendNetwork {
        name: "bench".into(),
        networks: vec!["10.0.0.0/8".parse().unwrap()],
        hostnames: vec![],
        ports: vec!["5900-6999".parse().unwrap()],
        ports_by_type: Default::default(),
    }]));
    let validator = TokenValidator::new(policy, vec![source], true, allow).unwrap();
    (signer, validator)
}

fn request() -> MintRequest {
    MintRequest {
        issuer: "porthole".into(),
        audience: "porthole".into(),
        instance: "0b5c3a7e-6f0d-4c36-9d57-1b2f4f0e9c11".into(),
        user: None,
        console: ConsoleClaim {
            kind: ConsoleType::Novnc,
            host: "10.1.2.3".into(),
            port: 5901,
            tls_port: None,
            view_only: false,
            record: false,
        },
        ttl_secs: 300,
    }
}

fn tokens(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut validate = c.benchmark_group("validate");
    validate.throughput(Throughput::Elements(1));
    let mut fixtures = Vec::new();
    for kind in [
        KeyKind::Ed25519,
        KeyKind::Es256,
        KeyKind::Rs256,
        KeyKind::Hs256,
    ] {
        let (signer, validator) = setup(kind, dir.path());
        let token = signer.sign(&request().claims(unix_now())).unwrap();
        let now = unix_now();
        validate.bench_function(format!("{:?}", signer.algorithm()), |b| {
            b.iter(|| {
                validator
                    .check(black_box(token.expose()), Some(ConsoleType::Novnc), now)
                    .unwrap()
            })
        });
        fixtures.push(signer);
    }
    validate.finish();

    let mut mint = c.benchmark_group("mint");
    mint.throughput(Throughput::Elements(1));
    let req = request();
    for signer in &fixtures {
        mint.bench_function(format!("{:?}", signer.algorithm()), |b| {
            b.iter(|| signer.sign(&req.claims(black_box(unix_now()))).unwrap())
        });
    }
    mint.finish();
}

mod group {
    #![allow(missing_docs)]
    criterion::criterion_group!(benches, super::tokens);
}

criterion_main!(group::benches);

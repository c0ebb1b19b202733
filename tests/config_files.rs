//! Config files: fixtures under `tests/data/config/{valid,invalid}` and the
//! example config. Invalid fixtures state what they expect in `# expect:`
//! lines: `KEY @ LINE:COL MESSAGE-FRAGMENT`.

use std::path::{Path, PathBuf};

use porthole::config::Config;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    // A data-driven test that found no data proves nothing.
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

#[test]
fn valid_fixtures_validate() {
    for file in fixtures("valid") {
        Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn invalid_fixtures_report_every_problem_with_its_location() {
    for file in fixtures("invalid") {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} states no expectation",
            file.display()
        );
        let err = Config::load(&file).expect_err("invalid fixture must fail");
        assert_eq!(
            err.issues.len(),
            expected.len(),
            "{}: {err}",
            file.display()
        );
        for want in expected {
            let (key, rest) = want.split_once(" @ ").unwrap();
            let (at, fragment) = rest.split_once(' ').unwrap();
            let (line, col) = at.split_once(':').unwrap();
            let at = Some((line.parse().unwrap(), col.parse().unwrap()));
            assert!(
                err.issues
                    .iter()
                    .any(|i| i.key == key && i.at == at && i.message.contains(fragment)),
                "{}: expected `{want}`, got:\n{err}",
                file.display()
            );
        }
    }
}

#[test]
fn the_example_config_documents_a_valid_setup() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("porthole.example.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    // The example names key files under keys/; give it a folder that has the
    // bearer key it reads at validation time.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(
        dir.path().join("keys/issuance-bearer.key"),
        "0123456789abcdef0123",
    )
    .unwrap();
    let config = Config::from_toml(&text, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.listen.public_base_url,
        "https://consoles.example.com/porthole"
    );
    assert_eq!(config.tokens.keys.len(), 2);
    assert_eq!(config.allow.backends().len(), 1);
    assert!(config.issuance.is_some());
    assert_eq!(
        config.listen.allowed_origins,
        [
            "https://consoles.example.com",
            "https://dashboard.example.com"
        ]
    );
    assert_eq!(config.listen.public_extra.len(), 1);
    assert!(config.listen.tls.is_some());
    assert_eq!(config.websocket.max_sessions, 5000);
}

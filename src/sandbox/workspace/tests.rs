use std::io::{Read, Write};

use super::*;

fn workspace() -> (tempfile::TempDir, Workspace) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ws = Workspace::open(dir.path(), None).expect("open workspace");
    (dir, ws)
}

fn write(ws: &Workspace, path: &str, data: &[u8]) {
    let mut up = ws.create(path).expect("create");
    up.file().expect("file").write_all(data).expect("write");
    up.commit().expect("commit");
}

#[test]
fn components_reject_escapes() {
    assert_eq!(components("a/./b//c").expect("ok"), vec!["a", "b", "c"]);
    assert_eq!(components("").expect("ok"), Vec::<&str>::new());
    assert_eq!(components(".").expect("ok"), Vec::<&str>::new());
    for bad in ["/etc/passwd", "../x", "a/../../x", "a/..", "a\0b", "a\nb"] {
        assert!(matches!(components(bad), Err(PathError::Denied)), "{bad:?}");
    }
}

#[test]
fn write_read_list_exists_round_trip() {
    let (_dir, ws) = workspace();
    write(&ws, "src/pkg/main.py", b"print(1)\n");
    let mut text = String::new();
    ws.read("src/pkg/main.py")
        .expect("read")
        .read_to_string(&mut text)
        .expect("utf8");
    assert_eq!(text, "print(1)\n");
    let names: Vec<(String, &str, u64)> = ws
        .list("src", 100)
        .expect("list")
        .into_iter()
        .map(|e| (e.name, e.kind, if e.kind == "file" { e.size } else { 0 }))
        .collect();
    assert_eq!(names, vec![("pkg".to_string(), "directory", 0)]);
    assert_eq!(ws.list("src/pkg", 100).expect("list")[0].size, 9);
    assert!(ws.exists("src/pkg/main.py").expect("exists"));
    assert!(!ws.exists("src/nope/main.py").expect("exists"));
    assert!(ws.exists("").expect("root exists"));
    // No temporary file stays behind.
    assert_eq!(ws.list("src/pkg", 100).expect("list").len(), 1);
}

#[test]
fn symlinks_are_never_followed() {
    let (dir, ws) = workspace();
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("secret"), b"s3cret").expect("secret");
    std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).expect("dir link");
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("s"))
        .expect("file link");
    assert!(matches!(ws.read("out/secret"), Err(PathError::Denied)));
    assert!(matches!(ws.read("s"), Err(PathError::Denied)));
    assert!(matches!(ws.list("out", 10), Err(PathError::Denied)));
    assert!(matches!(ws.create("out/new"), Err(PathError::Denied)));
    // Writing over a link replaces the link; the target is untouched.
    write(&ws, "s", b"mine");
    assert_eq!(
        std::fs::read(outside.path().join("secret")).expect("read"),
        b"s3cret"
    );
    assert_eq!(std::fs::read(dir.path().join("s")).expect("read"), b"mine");
}

#[test]
fn list_is_bounded_and_reads_refuse_directories() {
    let (_dir, ws) = workspace();
    for i in 0..5 {
        write(&ws, &format!("f{i}"), b"x");
    }
    assert_eq!(ws.list("", 3).expect("list").len(), 3);
    assert!(matches!(ws.read(""), Err(PathError::NotAFile)));
    std::fs::create_dir(ws.root().join("d")).expect("mkdir");
    assert!(matches!(ws.read("d"), Err(PathError::NotAFile)));
    assert!(matches!(ws.list("f0", 3), Err(PathError::NotADirectory)));
    assert!(matches!(
        ws.create("d").map(|u| u.commit()),
        Ok(Err(PathError::NotAFile))
    ));
}

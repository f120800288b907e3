//! `switchyard sandbox` speaks upstream's runtime API: the request and reply shapes that the
//! agent-sandbox Python client (`k8s_agent_sandbox`) sends and parses, checked byte for byte.

mod support;

use support::sandbox::{Executed, SandboxRuntime};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

async fn runtime(extra: &[&str]) -> SandboxRuntime {
    SandboxRuntime::start(BIN.as_ref(), extra, &[])
        .await
        .expect("sandbox runtime starts")
}

#[tokio::test]
async fn health_and_execute_shapes() {
    let rt = runtime(&[]).await;
    let health = rt.client.get(&rt.url("/")).await.expect("health");
    assert_eq!(health.status, 200);
    assert_eq!(
        health.text(),
        r#"{"status":"ok","message":"Sandbox Runtime is active."}"#
    );

    // shlex splitting, no shell: quotes group, `>` is an ordinary argument.
    let r = rt.execute("echo 'a  b' > c").await.expect("execute");
    assert_eq!(
        r,
        Executed {
            stdout: "a  b > c\n".into(),
            stderr: String::new(),
            exit_code: 0
        }
    );
    let r = rt
        .execute("sh -c 'echo out; echo err >&2; exit 3'")
        .await
        .expect("execute");
    assert_eq!(
        r,
        Executed {
            stdout: "out\n".into(),
            stderr: "err\n".into(),
            exit_code: 3
        }
    );
    // The command runs in the workspace, with the runtime's environment withheld.
    let r = rt.execute("sh -c 'pwd; echo $HOME'").await.expect("pwd");
    let ws = rt.workspace.canonicalize().expect("workspace");
    assert_eq!(r.stdout, format!("{}\n{}\n", ws.display(), ws.display()));
    // Failures to run are upstream's 200 + exit 1 + "Failed to execute command: ...".
    let r = rt.execute("echo 'unclosed").await.expect("execute");
    assert_eq!(
        r,
        Executed {
            stdout: String::new(),
            stderr: "Failed to execute command: No closing quotation".into(),
            exit_code: 1
        }
    );
    let r = rt.execute("no-such-program-xyz").await.expect("execute");
    assert_eq!(r.exit_code, 127);
    assert!(
        r.stderr
            .starts_with("Failed to execute command: no-such-program-xyz: "),
        "{r:?}"
    );
    // Killed by a signal: Python's negative return code, as upstream reports it.
    let r = rt.execute("sh -c 'kill -TERM $$'").await.expect("execute");
    assert_eq!(r.exit_code, -15);
    // A body that does not validate: FastAPI's 422 with `detail`.
    let bad = rt
        .client
        .post_json(&rt.url("/execute"), &[], r#"{"cmd":"ls"}"#)
        .await
        .expect("post");
    assert_eq!(bad.status, 422);
    assert!(bad
        .text()
        .starts_with(r#"{"detail":"invalid /execute body: missing field `command`"#));
}

#[tokio::test]
async fn files_round_trip_with_upstream_shapes() {
    let rt = runtime(&[]).await;
    let up = rt
        .upload("src/app/main.py", b"print('hi')\n")
        .await
        .expect("upload");
    assert_eq!(up.status, 200);
    assert_eq!(
        up.text(),
        r#"{"message":"File 'src/app/main.py' uploaded successfully."}"#
    );
    let down = rt
        .get("download", "src/app/main.py")
        .await
        .expect("download");
    assert_eq!(down.status, 200);
    assert_eq!(&down.body[..], b"print('hi')\n");
    assert_eq!(down.header("content-type"), "application/octet-stream");
    assert_eq!(
        down.header("content-disposition"),
        r#"attachment; filename="src/app/main.py""#
    );
    assert_eq!(down.header("content-length"), "12");

    let list = rt.get("list", "src/app").await.expect("list");
    assert_eq!(list.status, 200);
    let entries: serde_json::Value = serde_json::from_slice(&list.body).expect("json");
    let entry = &entries[0];
    assert_eq!(entries.as_array().map(Vec::len), Some(1));
    assert_eq!(entry["name"], "main.py");
    assert_eq!(entry["size"], 12);
    assert_eq!(entry["type"], "file");
    assert!(entry["mod_time"].as_f64().unwrap_or(0.0) > 1.7e9);
    let root = rt.client.get(&rt.url("/list/")).await.expect("list root");
    let root: serde_json::Value = serde_json::from_slice(&root.body).expect("json");
    assert_eq!(root[0]["name"], "src");
    assert_eq!(root[0]["type"], "directory");
    let dot = rt.get("list", ".").await.expect("list .");
    let dot: serde_json::Value = serde_json::from_slice(&dot.body).expect("json");
    assert_eq!(dot, root);

    let exists = rt.get("exists", "src/app/main.py").await.expect("exists");
    assert_eq!(exists.text(), r#"{"path":"src/app/main.py","exists":true}"#);
    let missing = rt.get("exists", "nope.txt").await.expect("exists");
    assert_eq!(missing.text(), r#"{"path":"nope.txt","exists":false}"#);

    let r = rt.execute("python3 src/app/main.py").await.expect("run");
    assert_eq!(r.stdout, "hi\n");

    let nf = rt.get("download", "nope.txt").await.expect("download");
    assert_eq!(
        (nf.status.as_u16(), nf.text()),
        (404, r#"{"message":"File not found"}"#.to_string())
    );
    let nd = rt.get("list", "src/app/main.py").await.expect("list file");
    assert_eq!(
        (nd.status.as_u16(), nd.text()),
        (404, r#"{"message":"Path is not a directory"}"#.to_string())
    );
    let dir = rt.get("download", "src").await.expect("download dir");
    assert_eq!(dir.status, 404);
}

#[tokio::test]
async fn uploads_are_capped() {
    let rt = runtime(&["--max-upload=1Ki"]).await;
    let ok = rt.upload("small.bin", &[7u8; 1024]).await.expect("upload");
    assert_eq!(ok.status, 200);
    let big = rt.upload("big.bin", &[7u8; 1025]).await.expect("upload");
    assert_eq!(big.status, 413);
    assert_eq!(
        big.text(),
        r#"{"message":"File upload failed: the file is larger than 1024 bytes"}"#
    );
    // Neither the file nor its temporary remains.
    let names: Vec<String> = std::fs::read_dir(&rt.workspace)
        .expect("workspace")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["small.bin".to_string()]);
    rt.assert_serving().await.expect("still serving");
}

#[tokio::test]
async fn concurrent_commands_are_bounded() {
    let rt = runtime(&["--max-concurrent=1"]).await;
    let slow = rt.execute("sleep 1");
    let fast = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let body = serde_json::json!({"command": "echo hi"}).to_string();
        rt.client.post_json(&rt.url("/execute"), &[], body).await
    };
    let (slow, fast) = tokio::join!(slow, fast);
    assert_eq!(slow.expect("slow").exit_code, 0);
    let fast = fast.expect("fast");
    assert_eq!(fast.status, 503);
    assert_eq!(
        fast.text(),
        r#"{"message":"1 commands are running (limit 1); retry later"}"#
    );
}

//! Parser tests on outputs in the shapes Qwen2.5(-Coder) produces, each fed whole and in every
//! chunking from 1 byte up, which must agree.

use super::*;

/// Content and `(name, arguments)` per call, as a client reassembles them from the events.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    content: String,
    calls: Vec<(String, String)>,
}

fn collect(events: impl IntoIterator<Item = ToolEvent>, seen: &mut Seen, ids: &mut Vec<String>) {
    for e in events {
        match e {
            ToolEvent::Content(t) => seen.content.push_str(&t),
            ToolEvent::Start { index, id, name } => {
                assert_eq!(index, seen.calls.len(), "indices count up from 0");
                assert!(id.starts_with("chatcmpl-tool-") && id.len() == 46, "{id}");
                assert!(!ids.contains(&id), "ids are unique");
                ids.push(id);
                seen.calls.push((name, String::new()));
            }
            ToolEvent::Args { index, fragment } => {
                assert_eq!(index + 1, seen.calls.len(), "fragments follow their start");
                seen.calls[index].1.push_str(&fragment);
            }
        }
    }
}

/// Parses `text` whole and in chunks of every size up to its length; all must agree (also
/// with the parser's own record of the calls). Returns the whole-text result.
fn parse(text: &str, names: &[&str], parallel: bool) -> Seen {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let run = |chunk: usize| {
        let mut p = ToolParser::new(names.clone(), parallel);
        let mut seen = Seen {
            content: String::new(),
            calls: Vec::new(),
        };
        let mut ids = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(chunk) {
            let piece: String = piece.iter().collect();
            collect(p.feed(&piece), &mut seen, &mut ids);
        }
        collect(p.finish(), &mut seen, &mut ids);
        let reported: Vec<_> = p
            .reported_calls()
            .iter()
            .map(|c| (c.name.clone(), c.arguments.clone()))
            .collect();
        assert_eq!(reported, seen.calls, "chunk {chunk}: record vs events");
        seen
    };
    let whole = run(text.chars().count().max(1));
    for chunk in 1..text.chars().count() {
        assert_eq!(run(chunk), whole, "chunk size {chunk} of {text:?}");
    }
    whole
}

fn seen(content: &str, calls: &[(&str, &str)]) -> Seen {
    Seen {
        content: content.to_owned(),
        calls: calls
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect(),
    }
}

const TOOLS: &[&str] = &["get_weather", "run_python"];

#[test]
fn hermes_single_call() {
    let out = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";
    assert_eq!(
        parse(out, TOOLS, true),
        seen(
            "",
            &[(
                "get_weather",
                "{\"city\": \"Paris\", \"unit\": \"celsius\"}"
            )]
        )
    );
}

#[test]
fn hermes_parallel_calls_with_leading_content() {
    let out = "I'll check both cities.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Berlin\"}}\n</tool_call>";
    assert_eq!(
        parse(out, TOOLS, true),
        seen(
            "I'll check both cities.",
            &[
                ("get_weather", "{\"city\": \"Paris\"}"),
                ("get_weather", "{\"city\": \"Berlin\"}")
            ]
        )
    );
    // parallel_tool_calls: false keeps the first.
    assert_eq!(
        parse(out, TOOLS, false),
        seen(
            "I'll check both cities.",
            &[("get_weather", "{\"city\": \"Paris\"}")]
        )
    );
}

#[test]
fn hermes_arguments_with_braces_quotes_and_unicode_in_strings() {
    let out = "<tool_call>\n{\"name\": \"run_python\", \"arguments\": {\"code\": \"d = {'a': [1, 2]}\\nprint(\\\"}\\\", d, 'é→')\"}}\n</tool_call>";
    assert_eq!(
        parse(out, TOOLS, true),
        seen(
            "",
            &[(
                "run_python",
                "{\"code\": \"d = {'a': [1, 2]}\\nprint(\\\"}\\\", d, 'é→')\"}"
            )]
        )
    );
}

#[test]
fn hermes_unterminated_at_end_of_output() {
    // EOS (or a stop) before `</tool_call>`.
    let out = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}";
    assert_eq!(
        parse(out, TOOLS, true),
        seen("", &[("get_weather", "{\"city\": \"Oslo\"}")])
    );
}

#[test]
fn hermes_arguments_as_json_string_and_parameters_key() {
    let out = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}\n</tool_call>";
    assert_eq!(
        parse(out, TOOLS, true),
        seen("", &[("get_weather", "{\"city\": \"Rome\"}")])
    );
    let out = "<tool_call>\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}\n</tool_call>";
    assert_eq!(
        parse(out, TOOLS, true),
        seen("", &[("get_weather", "{\"city\": \"Rome\"}")])
    );
}

#[test]
fn hermes_keys_in_other_order_are_parsed_whole() {
    let out = "<tool_call>\n{\"arguments\": {\"city\": \"Rome\"}, \"name\": \"get_weather\"}\n</tool_call>";
    assert_eq!(
        parse(out, TOOLS, true),
        seen("", &[("get_weather", "{\"city\": \"Rome\"}")])
    );
}

#[test]
fn hermes_block_that_is_not_json_is_content() {
    let out = "<tool_call>\nget_weather(Paris)\n</tool_call>";
    assert_eq!(
        parse(out, TOOLS, true),
        seen("<tool_call>\nget_weather(Paris)\n</tool_call>", &[])
    );
}

#[test]
fn qwen_coder_bare_json_object() {
    let out = "{\"name\": \"run_python\", \"arguments\": {\"code\": \"print(2 ** 10)\"}}";
    assert_eq!(
        parse(out, TOOLS, true),
        seen("", &[("run_python", "{\"code\": \"print(2 ** 10)\"}")])
    );
    // Two objects on separate lines, and a list.
    let out = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}";
    assert_eq!(
        parse(out, TOOLS, true),
        seen(
            "",
            &[
                ("get_weather", "{\"city\": \"Paris\"}"),
                ("get_weather", "{\"city\": \"Lima\"}")
            ]
        )
    );
    let out = "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Quito\"}}]";
    assert_eq!(
        parse(out, TOOLS, true),
        seen("", &[("get_weather", "{\"city\": \"Quito\"}")])
    );
}

#[test]
fn qwen_coder_fenced_json_block() {
    let out = "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}}\n```";
    assert_eq!(
        parse(out, TOOLS, true),
        seen(
            "",
            &[(
                "get_weather",
                "{\"city\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}"
            )]
        )
    );
    let out = "```\n{\"name\": \"run_python\", \"arguments\": {}}\n```\n";
    assert_eq!(parse(out, TOOLS, true), seen("", &[("run_python", "{}")]));
}

#[test]
fn json_answers_that_are_not_calls_stay_content() {
    for out in [
        "{\"answer\": 42}",
        // A call-shaped object naming a function the request did not declare.
        "{\"name\": \"delete_everything\", \"arguments\": {}}",
        "```json\n{\"city\": \"Paris\"}\n```",
        "[1, 2, 3]",
        "{\"name\": \"get_weather\", \"arguments\": {\"city\": ",
    ] {
        assert_eq!(parse(out, TOOLS, true), seen(out, &[]), "{out}");
    }
}

#[test]
fn plain_text_streams_and_lookalikes_survive() {
    assert_eq!(
        parse("The weather in Paris is 18°C.\n", TOOLS, true),
        seen("The weather in Paris is 18°C.\n", &[])
    );
    assert_eq!(
        parse("  <tool is not a tag> and `{` inside text", TOOLS, true),
        seen("  <tool is not a tag> and `{` inside text", &[])
    );
    assert_eq!(parse("", TOOLS, true), seen("", &[]));
}

#[test]
fn streaming_releases_text_early_and_arguments_in_fragments() {
    let mut p = ToolParser::new(vec!["get_weather".into()], true);
    assert_eq!(
        p.feed("Sure"),
        vec![ToolEvent::Content("Sure".into())],
        "plain text is not held"
    );
    assert_eq!(p.feed(".\n<tool_"), vec![ToolEvent::Content(".".into())]);
    let ev = p.feed("call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci");
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(matches!(&ev[0], ToolEvent::Start { index: 0, name, .. } if name == "get_weather"));
    assert_eq!(
        ev[1],
        ToolEvent::Args {
            index: 0,
            fragment: "{\"ci".into()
        }
    );
    assert_eq!(
        p.feed("ty\": \"Paris\"}}\n</tool_call>"),
        vec![ToolEvent::Args {
            index: 0,
            fragment: "ty\": \"Paris\"}".into()
        }]
    );
    assert_eq!(p.finish(), vec![]);
}

#[test]
fn named_choice_streams_the_whole_output_as_arguments() {
    let mut p = ToolParser::named("get_weather".into());
    let ev = p.feed("{\"city\": ");
    assert!(matches!(&ev[0], ToolEvent::Start { index: 0, name, .. } if name == "get_weather"));
    assert_eq!(
        ev[1],
        ToolEvent::Args {
            index: 0,
            fragment: "{\"city\": ".into()
        }
    );
    assert_eq!(
        p.feed("\"Paris\"}"),
        vec![ToolEvent::Args {
            index: 0,
            fragment: "\"Paris\"}".into()
        }]
    );
    assert_eq!(p.finish(), vec![]);
    assert_eq!(p.reported_calls()[0].arguments, "{\"city\": \"Paris\"}");
}

//! No import cycles between the modules of a crate: `cargo nextest run -p jumpgate-tests --test
//! import_cycles` fails naming every cycle it finds, and the modules that tie it.
//!
//! A module is a file (`leases/file.rs` is `leases::file`); a folder's `mod.rs` is the folder's
//! module. Per file, as farm-studio draws the house, so a cycle between two files of one folder
//! counts as much as one between folders. Two rules follow how Rust modules nest: a folder's
//! module uses every module below it (it declares them), and a module's use of its own ancestors
//! (`super::Item` from a child) is not counted. The crate root (`lib.rs`, `main.rs`) is left
//! out: it declares every module and hands names on, so it is tied to all of them by
//! construction. `#[cfg(test)]` modules are left out too: a test may use any module.
//!
//! An edge A -> B is any `crate::...` path in A's code (comments and string literals are not
//! read), `use crate::{...}` groups included, and any `super::...` path, resolved from A's place;
//! each path counts for the longest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cycles known today and allowed until their fix lands, as `(crate folder, modules)`.
const ALLOWED: &[(&str, &[&str])] = &[];

/// Every crate of the workspace whose modules are checked.
fn crates() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs = vec![
        root.join("relay-server"),
        root.join("worker-agent"),
        root.join("bench"),
    ];
    let mut libs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("src").is_dir())
        .collect();
    libs.sort();
    dirs.extend(libs);
    dirs
}

/// The `.rs` files below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` without comments and without the contents of string and char literals, so that only
/// code is read.
fn code_only(text: &str) -> String {
    let bytes: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < bytes.len() && bytes[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < bytes.len() {
                if bytes[i] == '/' && bytes.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if bytes[i] == '*' && bytes.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && is_raw_string(&bytes, i) {
            // r"..." or r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while bytes.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            j += 1;
            loop {
                if j >= bytes.len() {
                    break;
                }
                if bytes[j] == '"' && (0..hashes).all(|k| bytes.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < bytes.len() && bytes[i] != '"' {
                if bytes[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && bytes.get(i + 2) == Some(&'\'') {
            out.push_str("' '");
            i += 3;
        } else if c == '\'' && next == Some('\\') {
            // '\n', '\x7f', '\u{..}'
            let mut j = i + 2;
            while j < bytes.len() && bytes[j] != '\'' {
                j += 1;
            }
            out.push_str("' '");
            i = j + 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Whether the `r` at `i` opens a raw string (and is not the end of an identifier).
fn is_raw_string(chars: &[char], i: usize) -> bool {
    let starts = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
    let mut j = i + 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    starts && chars.get(j) == Some(&'"')
}

/// The identifier at the start of `s`, if any.
fn ident(s: &str) -> Option<&str> {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| &s[..end])
}

/// The paths that start `s` (just after `crate::` or `super::`), each as its identifiers:
/// `a::b::C` is one, `{a::B, c::{D, E}}` three.
fn paths(s: &str) -> Vec<Vec<String>> {
    /// Bytes of whitespace at the start of `s`.
    fn space(s: &str) -> usize {
        s.len() - s.trim_start().len()
    }
    /// Parses one path (or group) at the start of `s` under `prefix`; the bytes it read.
    fn parse(s: &str, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
        let mut path = prefix.to_vec();
        let mut i = space(s);
        loop {
            if s[i..].starts_with('{') {
                i += 1;
                loop {
                    i += space(&s[i..]);
                    if s[i..].starts_with('}') {
                        return i + 1;
                    }
                    i += parse(&s[i..], &path, out);
                    i += space(&s[i..]);
                    if let Some(rest) = s[i..].strip_prefix("as ") {
                        i += 3 + space(rest);
                        i += ident(&s[i..]).map_or(0, str::len);
                        i += space(&s[i..]);
                    }
                    match s[i..].chars().next() {
                        Some(',') => i += 1,
                        Some('}') => return i + 1,
                        _ => return i,
                    }
                }
            }
            let Some(name) = ident(&s[i..]) else {
                break;
            };
            path.push(name.to_owned());
            i += name.len();
            if s[i..].starts_with("::") {
                i += 2;
            } else {
                break;
            }
        }
        if path.len() > prefix.len() {
            out.push(path);
        }
        i
    }
    let mut out = Vec::new();
    parse(s, &[], &mut out);
    out
}

/// The module paths that `code` (a file at module path `at`, e.g. `["leases", "file"]`)
/// names through `crate::` or `super::` paths, as full paths from the crate root (they may run
/// on into an item's name).
fn named_paths(code: &str, at: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    for (i, _) in code.match_indices("crate::") {
        if code[..i].chars().next_back().is_some_and(is_word) {
            continue;
        }
        found.extend(paths(&code[i + "crate::".len()..]));
    }
    for (i, _) in code.match_indices("super::") {
        if code[..i].chars().next_back().is_some_and(is_word) || code[..i].ends_with("super::") {
            continue;
        }
        let mut rest = &code[i..];
        let mut climbs = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = r;
        }
        let Some(base) = at.len().checked_sub(climbs) else {
            continue;
        };
        for path in paths(rest) {
            let mut full = at[..base].to_vec();
            full.extend(path);
            found.push(full);
        }
    }
    found
}

/// `code` without its `#[cfg(test)] mod ... { }` blocks: tests may use any module.
fn without_test_modules(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let body = after.trim_start();
        let is_mod = body.starts_with("mod ") || body.starts_with("pub mod ");
        match body.find(['{', ';']).filter(|_| is_mod) {
            Some(open) if body[open..].starts_with('{') => {
                let mut depth = 0;
                let mut end = body.len();
                for (i, c) in body[open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &body[end..];
            }
            _ => {
                out.push_str("#[cfg(test)]");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The module path of a file under `src` (`leases/file.rs`: `leases::file`, `leases/mod.rs`:
/// `leases`, the crate root: empty).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && !(parts.is_empty() && (stem == "lib" || stem == "main")) {
        parts.push(stem.to_owned());
    }
    parts
}

/// The crate's module graph, a module a file (`leases::file`; a folder's `mod.rs` is the
/// folder's module): module -> modules it uses. A folder's module uses every module below it
/// (it declares them); a module's uses of its own ancestors are not counted, as a child reading
/// its parent's items is how Rust modules nest. The crate root is left out.
fn module_graph(krate: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let src = krate.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Vec<String>> = files
        .iter()
        .map(|f| module_of(&src, f))
        .filter(|m| !m.is_empty())
        .collect();
    let name = |m: &[String]| m.join("::");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let at = module_of(&src, file);
        if at.is_empty() {
            continue; // the crate root
        }
        let code = without_test_modules(&code_only(&std::fs::read_to_string(file).unwrap()));
        let mut uses: BTreeSet<Vec<String>> = modules
            .iter()
            .filter(|m| m.len() == at.len() + 1 && m.starts_with(&at))
            .cloned()
            .collect();
        for path in named_paths(&code, &at) {
            // The longest prefix of the path that is a module of the crate.
            if let Some(target) = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains(p))
            {
                if !at.starts_with(&target) {
                    uses.insert(target);
                }
            }
        }
        graph
            .entry(name(&at))
            .or_default()
            .extend(uses.iter().map(|m| name(m)));
    }
    graph
}

/// The strongly connected components of more than one module (Tarjan), each sorted.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[w].min(s.low[v]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.index[w].min(s.low[v]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found.sort();
    state.found
}

/// How a cycle reads in a failure: each module with the members of the cycle it names.
fn describe(graph: &BTreeMap<String, BTreeSet<String>>, cycle: &[String]) -> String {
    cycle
        .iter()
        .map(|m| {
            let to: Vec<&str> = graph[m]
                .iter()
                .filter(|t| cycle.contains(t))
                .map(String::as_str)
                .collect();
            format!("{m} -> {}", to.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let mut problems = Vec::new();
    let mut allowed_seen = BTreeSet::new();
    for krate in crates() {
        let name = krate.file_name().unwrap().to_string_lossy().into_owned();
        let graph = module_graph(&krate);
        for cycle in cycles(&graph) {
            let allowed = ALLOWED.iter().position(|(k, mods)| {
                *k == name
                    && mods.len() == cycle.len()
                    && mods.iter().all(|m| cycle.contains(&m.to_string()))
            });
            match allowed {
                Some(i) => {
                    allowed_seen.insert(i);
                }
                None => problems.push(format!(
                    "{name}: {} form a cycle ({})",
                    cycle.join(" <-> "),
                    describe(&graph, &cycle)
                )),
            }
        }
    }
    for (i, (k, mods)) in ALLOWED.iter().enumerate() {
        if !allowed_seen.contains(&i) {
            problems.push(format!(
                "{k}: the allowed cycle {mods:?} is gone; delete its entry from ALLOWED in tests/tests/import_cycles.rs"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "import cycles between modules (move the type both sides need to where it \
         belongs, usually the lower module):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_parser_reads_crate_and_super_paths_and_skips_comments_and_strings() {
    let code = code_only(
        "use crate::{config::X, error};\n\
         // use crate::commented;\n\
         let s = \"crate::in_string\";\n\
         let r = r#\"crate::raw\"#;\n\
         fn f() -> crate::leases::Y { super::admin::z() }\n\
         /* crate::block */ let c = '\"'; super::super::metrics::m();",
    );
    let at = vec!["users".to_owned(), "ports".to_owned()];
    let found: Vec<String> = named_paths(&code, &at)
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(
        found,
        [
            "config::X",
            "error",
            "leases::Y",
            "users::admin::z",
            "metrics::m"
        ]
    );
    let trimmed = without_test_modules("a\n#[cfg(test)]\nmod tests { use crate::b; { } }\nc");
    assert_eq!(trimmed, "a\n\nc");
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    graph.insert("d".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(cycles(&graph), vec![vec!["a", "b", "c"]]);
}

use super::*;

/// A minimal XML well-formedness check (the report is XHTML-compatible:
/// every element closed, attributes quoted): tags nest, the document has
/// one root.
fn check_nesting(html: &str) -> Result<(), String> {
    let body = html.strip_prefix("<!DOCTYPE html>\n").ok_or("no doctype")?;
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').ok_or("unterminated tag")?;
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack
                .pop()
                .ok_or(format!("</{name}> without an opening tag"))?;
            if open != name {
                return Err(format!("<{open}> closed by </{name}>"));
            }
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().ok_or("empty tag")?;
            if tag.matches('"').count() % 2 != 0 {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            stack.push(name.to_string());
        }
    }
    if stack.is_empty() {
        Ok(())
    } else {
        Err(format!("unclosed: {stack:?}"))
    }
}

/// The attribute `name` of every `<tag ...>` inside `text`.
fn attrs<'a>(text: &'a str, tag: &str, name: &str) -> Vec<&'a str> {
    let open = format!("<{tag} ");
    let key = format!("{name}=\"");
    text.match_indices(&open)
        .filter_map(|(i, _)| {
            let t = &text[i..i + text[i..].find('>')?];
            let j = t.find(&key)? + key.len();
            Some(&t[j..j + t[j..].find('"')?])
        })
        .collect()
}

#[test]
fn report_parses_and_plots_the_csv_values() {
    let cells: Vec<Cell> = matrix()
        .into_iter()
        .filter(|c| c.backend == BackendKind::Interp)
        .collect();
    let out = std::env::temp_dir().join(format!("duet-bench-io-{}", std::process::id()));
    let mut progress = Vec::new();
    let results = run(&cells, 64, &out, "duet bench io (test)", &mut progress).unwrap();
    let progress = String::from_utf8(progress).unwrap();
    assert_eq!(progress.lines().count(), cells.len(), "{progress}");
    let csv_text = std::fs::read_to_string(out.join("io-results.csv")).unwrap();
    let html_text = std::fs::read_to_string(out.join("io-report.html")).unwrap();
    check_nesting(&html_text).unwrap();

    // The e1000 on the interpreter with userspace chips was measured; the
    // interpreter has no kernel chip: those rows are kept, marked.
    let lines: Vec<&str> = csv_text.lines().collect();
    assert_eq!(lines.len(), cells.len() + 1);
    let e1000 = lines
        .iter()
        .find(|l| l.starts_with("e1000,interp,userspace,off,measured"))
        .expect("the e1000 cell was measured");
    assert!(lines
        .iter()
        .any(|l| l.starts_with("e1000,interp,kernel,off,\"skipped: the interpreter")));
    let values: Vec<&str> = e1000.split(',').skip(5).collect();
    assert_eq!(values.len(), METRICS.len());
    for v in &values {
        assert!(v.parse::<f64>().unwrap() > 0.0, "{e1000}");
    }
    // 64 frames, one interrupt each, per (64 × 1514 / 1e6) MB.
    let irq_per_mb: f64 = values[2].parse().unwrap();
    let want = 64.0 / (64.0 * 1514.0 / 1e6);
    assert!(
        (irq_per_mb - want).abs() / want < 0.002,
        "{irq_per_mb} vs {want}"
    );

    // Every metric has a plot with both axes and one series per NIC path,
    // and the plotted value of every measured cell is the CSV's.
    let svgs: Vec<&str> = html_text.split("<svg ").skip(1).collect();
    assert_eq!(svgs.len(), METRICS.len());
    for (svg, (key, _)) in svgs.iter().zip(METRICS) {
        let svg = &svg[..svg.find("</svg>").unwrap()];
        assert!(svg.contains(&format!("data-metric=\"{key}\"")));
        assert_eq!(attrs(svg, "g", "data-axis"), vec!["y", "x"], "{key}");
        assert_eq!(
            attrs(svg, "g", "data-path"),
            NicPath::ALL.iter().map(|n| n.name()).collect::<Vec<_>>(),
            "{key}"
        );
        let col = METRICS.iter().position(|(k, _)| *k == key).unwrap() + 5;
        let plotted = attrs(svg, "rect", "data-value");
        let from_csv: Vec<&str> = lines
            .iter()
            .filter(|l| l.contains(",measured,"))
            .map(|l| l.split(',').nth(col).unwrap())
            .filter(|v| !v.is_empty())
            .collect();
        assert_eq!(plotted, from_csv, "{key}");
    }
    assert_eq!(results.len(), cells.len());
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn every_cell_of_the_matrix_is_listed() {
    let m = matrix();
    assert_eq!(m.len(), 3 * 2 * 2 * 2);
    let csv_text = csv(&m
        .iter()
        .map(|c| (*c, CellResult::Skipped("x".into())))
        .collect::<Vec<_>>());
    assert_eq!(csv_text.lines().count(), m.len() + 1);
}

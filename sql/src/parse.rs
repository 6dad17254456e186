//! Statements parsed: sqlparser for SQL, and a thin layer of our own for
//! what KSQL adds to it.
//!
//! sqlparser (the generic dialect) parses the SELECTs, expressions, column
//! definitions, `WITH (…)` options and INSERTs. It cannot parse KSQL's
//! `CREATE STREAM`, `WINDOW TUMBLING (…)`, `EMIT CHANGES`, `PARTITION BY`
//! in a SELECT, nor ksqlDB's `SHOW`, `DESCRIBE`, `DROP … DELETE TOPIC` and
//! `TERMINATE`. So each statement is first tokenized by sqlparser's own
//! tokenizer; the KSQL clauses are read from the tokens and blanked out of
//! the text (spaces, keeping every other token's line and column, so
//! sqlparser's errors point into the text the user typed), `STREAM` after
//! `CREATE` becomes `TABLE `, and the rest goes to sqlparser. The short
//! ksqlDB commands are read from the tokens alone.

use std::collections::BTreeMap;

use runnel_client::plan::{EmitMode, ObjectKind, WindowSpec};
use sqlparser::ast;
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

use crate::error::{SqlError, SqlResult};

/// Characters in one statement (a script holds many).
pub const STATEMENT_CHARS_MAX: usize = 64 * 1024;
/// Statements in one script.
pub const STATEMENTS_MAX: usize = 1000;
/// A window's grace period when the statement gives none (ksqlDB's default).
pub const DEFAULT_GRACE_MS: i64 = 24 * 3600 * 1000;

/// One statement, as its text and what it says.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub text: String,
    pub statement: Statement,
}

#[derive(Clone, Debug)]
pub enum Statement {
    /// `CREATE STREAM|TABLE name (columns) WITH (…)`
    CreateSource {
        kind: ObjectKind,
        name: ast::Ident,
        columns: Vec<ast::ColumnDef>,
        with: With,
    },
    /// `CREATE STREAM|TABLE name [WITH (…)] AS SELECT …`
    CreateAs {
        kind: ObjectKind,
        name: ast::Ident,
        with: With,
        query: Query,
    },
    InsertValues {
        target: ast::Ident,
        columns: Vec<ast::Ident>,
        rows: Vec<Vec<ast::Expr>>,
    },
    InsertSelect {
        target: ast::Ident,
        query: Query,
    },
    /// A push query (`SELECT … EMIT CHANGES [LIMIT n]`), or without `EMIT`
    /// a pull query (`SELECT … FROM table WHERE key = …`).
    Select(Query),
    Show(Listing),
    Describe {
        name: String,
        extended: bool,
    },
    /// `EXPLAIN query_id` or `EXPLAIN SELECT …`.
    Explain(String),
    ExplainQuery(Query),
    Drop {
        kind: ObjectKind,
        name: String,
        if_exists: bool,
        delete_topic: bool,
    },
    Terminate(String),
    /// `TERMINATE ALL`.
    TerminateAll,
    /// `SET 'property' = 'value'` (a session property).
    Set {
        property: String,
        value: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    Streams,
    Tables,
    Queries,
    Topics,
    /// The session's properties (`SHOW PROPERTIES`).
    Properties,
}

/// A SELECT with KSQL's clauses.
#[derive(Clone, Debug)]
pub struct Query {
    pub select: Box<ast::Select>,
    pub window: Option<WindowSpec>,
    pub emit: Option<EmitMode>,
    pub partition_by: Vec<ast::Expr>,
    pub limit: Option<u64>,
    /// A stream–stream join's `WITHIN …` (one per query).
    pub within: Option<Within>,
    /// Stream–table joins by event time (`FOR SYSTEM_TIME AS OF …`).
    pub as_of: Vec<AsOfClause>,
}

/// `t FOR SYSTEM_TIME AS OF a.col [HISTORY n unit] [GRACE PERIOD n unit]`
/// after a joined table's name: the table's row as it was at the stream
/// row's `a.col`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsOfClause {
    /// The table's name as written before the clause (upper case unless
    /// quoted).
    pub table: String,
    /// The stream's column, as `[qualifier.]column`.
    pub at: Vec<ast::Ident>,
    /// How far back the table's rows are kept, if given.
    pub history_ms: Option<i64>,
    /// How long stream rows wait for the table (0 unless given).
    pub grace_ms: i64,
    /// Where the clause is, for errors.
    pub line: u64,
    pub column: u64,
}

/// `WITHIN n unit` or `WITHIN (before unit, after unit)`, then optionally
/// `GRACE PERIOD n unit`: how far apart the two sides' times may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Within {
    pub before_ms: i64,
    pub after_ms: i64,
    pub grace_ms: i64,
}

/// `WITH (KEY=value, …)` options, keys upper case.
#[derive(Clone, Debug, Default)]
pub struct With(pub BTreeMap<String, ast::Expr>);

impl With {
    pub fn text(&self, key: &str) -> SqlResult<Option<String>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(ast::Expr::Value(v)) => match &v.value {
                ast::Value::SingleQuotedString(s) | ast::Value::DoubleQuotedString(s) => Ok(Some(s.clone())),
                other => Err(SqlError::new(format!("{key} must be a quoted string, not {other}"))),
            },
            Some(other) => Err(SqlError::new(format!("{key} must be a quoted string, not {other}"))),
        }
    }

    pub fn number(&self, key: &str) -> SqlResult<Option<u64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(ast::Expr::Value(v)) => match &v.value {
                ast::Value::Number(n, _) => n
                    .parse()
                    .map(Some)
                    .map_err(|_| SqlError::new(format!("{key} must be a whole number, not {n}"))),
                other => Err(SqlError::new(format!("{key} must be a number, not {other}"))),
            },
            Some(other) => Err(SqlError::new(format!("{key} must be a number, not {other}"))),
        }
    }

    /// Refuses keys outside `known`, naming them.
    pub fn only(&self, known: &[&str]) -> SqlResult<()> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(key) => Err(SqlError::new(format!(
                "unknown WITH property {key}; known ones are {}",
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

/// Splits a script into statements at `;` (outside strings and comments)
/// and parses each: its text (what an error's line and column refer to)
/// and what it says.
pub fn parse_script(script: &str) -> Vec<(String, SqlResult<Parsed>)> {
    let tokens = match tokenize(script) {
        Ok(tokens) => tokens,
        Err(e) => return vec![(script.to_string(), Err(e))],
    };
    let chars: Vec<char> = script.chars().collect();
    let index = LineIndex::new(&chars);
    let mut statements = Vec::new();
    let mut start = 0;
    for (i, token) in tokens.iter().enumerate() {
        let last = i + 1 == tokens.len();
        if token.token != Token::SemiColon && !last {
            continue;
        }
        let end = if token.token == Token::SemiColon {
            index.offset(token.span.start)
        } else {
            chars.len()
        };
        let text: String = chars[start..end].iter().collect();
        start = index.offset(token.span.end);
        if text.trim().is_empty() {
            continue;
        }
        let text = text.trim().to_string();
        if statements.len() >= STATEMENTS_MAX {
            let refused = SqlError::new(format!("a script holds at most {STATEMENTS_MAX} statements"));
            statements.push((text, Err(refused)));
            break;
        }
        let parsed = parse_statement(&text);
        statements.push((text, parsed));
    }
    statements
}

/// Parses one statement (no `;` inside).
pub fn parse_statement(text: &str) -> SqlResult<Parsed> {
    if text.chars().count() > STATEMENT_CHARS_MAX {
        return Err(SqlError::new(format!(
            "a statement is at most {STATEMENT_CHARS_MAX} characters long"
        )));
    }
    let tokens: Vec<TokenWithSpan> = tokenize(text)?
        .into_iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_) | Token::SemiColon))
        .collect();
    let statement = match words(&tokens, 1).first().map(String::as_str) {
        Some("SHOW" | "LIST" | "DESCRIBE" | "DROP" | "TERMINATE" | "SET") => command(&tokens)?,
        Some("EXPLAIN") if words(&tokens, 2).get(1).map(String::as_str) != Some("SELECT") => command(&tokens)?,
        Some(_) => sql(text, &tokens)?,
        None => return Err(SqlError::new("empty statement")),
    };
    Ok(Parsed {
        text: text.to_string(),
        statement,
    })
}

fn tokenize(text: &str) -> SqlResult<Vec<TokenWithSpan>> {
    Tokenizer::new(&GenericDialect {}, text)
        .tokenize_with_location()
        .map_err(|e| SqlError::at(e.message, e.location.line, e.location.column))
}

/// The first `n` tokens as upper-case words (empty strings for non-words).
fn words(tokens: &[TokenWithSpan], n: usize) -> Vec<String> {
    tokens.iter().take(n).map(|t| word(&t.token)).collect()
}

fn word(token: &Token) -> String {
    match token {
        Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
        _ => String::new(),
    }
}

/// A name as ksqlDB reads it: upper case unless quoted.
pub fn name_of(token: &Token) -> Option<String> {
    match token {
        Token::Word(w) if w.quote_style.is_some() => Some(w.value.clone()),
        Token::Word(w) => Some(w.value.to_ascii_uppercase()),
        _ => None,
    }
}

fn unexpected(token: Option<&TokenWithSpan>, expected: &str) -> SqlError {
    match token {
        Some(t) => SqlError::at(
            format!("expected {expected}, found {}", t.token),
            t.span.start.line,
            t.span.start.column,
        ),
        None => SqlError::new(format!("expected {expected}, found the end of the statement")),
    }
}

/// SHOW, LIST, DESCRIBE, EXPLAIN id, DROP, TERMINATE.
fn command(tokens: &[TokenWithSpan]) -> SqlResult<Statement> {
    let w: Vec<String> = tokens.iter().map(|t| word(&t.token)).collect();
    let name_at = |i: usize| {
        tokens
            .get(i)
            .and_then(|t| name_of(&t.token))
            .ok_or_else(|| unexpected(tokens.get(i), "a name"))
    };
    let end_at = |i: usize| match tokens.get(i) {
        None => Ok(()),
        Some(t) => Err(unexpected(Some(t), "the end of the statement")),
    };
    let statement = match w[0].as_str() {
        "SHOW" | "LIST" => {
            let listing = match w.get(1).map(String::as_str) {
                Some("STREAMS") => Listing::Streams,
                Some("TABLES") => Listing::Tables,
                Some("QUERIES") => Listing::Queries,
                Some("TOPICS") => Listing::Topics,
                Some("PROPERTIES") => Listing::Properties,
                _ => {
                    return Err(unexpected(
                        tokens.get(1),
                        "STREAMS, TABLES, QUERIES, TOPICS or PROPERTIES",
                    ))
                }
            };
            end_at(2)?;
            Statement::Show(listing)
        }
        "DESCRIBE" => {
            let extended = w.get(2).map(String::as_str) == Some("EXTENDED");
            end_at(2 + usize::from(extended))?;
            Statement::Describe {
                name: name_at(1)?,
                extended,
            }
        }
        "EXPLAIN" => {
            end_at(2)?;
            Statement::Explain(name_at(1)?)
        }
        "TERMINATE" => {
            end_at(2)?;
            // Quoted, `ALL` names a query.
            match &tokens.get(1).map(|t| &t.token) {
                Some(Token::Word(w)) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("ALL") => {
                    Statement::TerminateAll
                }
                _ => Statement::Terminate(name_at(1)?),
            }
        }
        "SET" => {
            let quoted = |i: usize| match tokens.get(i).map(|t| &t.token) {
                Some(Token::SingleQuotedString(s)) => Ok(s.clone()),
                _ => Err(unexpected(tokens.get(i), "a quoted string")),
            };
            if tokens.get(2).map(|t| &t.token) != Some(&Token::Eq) {
                return Err(unexpected(tokens.get(2), "'='"));
            }
            end_at(4)?;
            Statement::Set {
                property: quoted(1)?,
                value: quoted(3)?,
            }
        }
        _ => drop_statement(tokens, &w)?,
    };
    Ok(statement)
}

/// `DROP STREAM|TABLE [IF EXISTS] name [DELETE TOPIC]`
fn drop_statement(tokens: &[TokenWithSpan], w: &[String]) -> SqlResult<Statement> {
    let kind = match w.get(1).map(String::as_str) {
        Some("STREAM") => ObjectKind::Stream,
        Some("TABLE") => ObjectKind::Table,
        _ => return Err(unexpected(tokens.get(1), "STREAM or TABLE")),
    };
    let if_exists = w.get(2).map(String::as_str) == Some("IF") && w.get(3).map(String::as_str) == Some("EXISTS");
    let at = if if_exists { 4 } else { 2 };
    let name = tokens
        .get(at)
        .and_then(|t| name_of(&t.token))
        .ok_or_else(|| unexpected(tokens.get(at), "a name"))?;
    let delete_topic = match (w.get(at + 1).map(String::as_str), w.get(at + 2).map(String::as_str)) {
        (None, _) => false,
        (Some("DELETE"), Some("TOPIC")) if tokens.len() == at + 3 => true,
        _ => {
            return Err(unexpected(
                tokens.get(at + 1),
                "DELETE TOPIC or the end of the statement",
            ))
        }
    };
    Ok(Statement::Drop {
        kind,
        name,
        if_exists,
        delete_topic,
    })
}

/// What the KSQL clauses said, read off the tokens.
#[derive(Default)]
struct Clauses {
    kind: Option<ObjectKind>,
    window: Option<WindowSpec>,
    emit: Option<EmitMode>,
    partition_by: Vec<ast::Expr>,
    within: Option<Within>,
    as_of: Vec<AsOfClause>,
}

/// A statement sqlparser reads once the KSQL clauses are out of the text.
fn sql(text: &str, tokens: &[TokenWithSpan]) -> SqlResult<Statement> {
    let mut chars: Vec<char> = text.chars().collect();
    let index = LineIndex::new(&chars);
    let clauses = extract_clauses(text, tokens, &index, &mut chars)?;
    let rewritten: String = chars.iter().collect();
    let mut statements =
        Parser::parse_sql(&GenericDialect {}, &rewritten).map_err(|e| SqlError::from_parser(e.to_string()))?;
    if statements.len() != 1 {
        return Err(SqlError::new("one statement at a time, each ended by ';'"));
    }
    convert(statements.remove(0), clauses)
}

/// Reads KSQL's clauses at the top level of the statement and blanks them out.
fn extract_clauses(text: &str, tokens: &[TokenWithSpan], index: &LineIndex, chars: &mut [char]) -> SqlResult<Clauses> {
    let mut clauses = Clauses::default();
    let w: Vec<String> = tokens.iter().map(|t| word(&t.token)).collect();
    if w.first().map(String::as_str) == Some("CREATE") {
        let at = if w.get(1).map(String::as_str) == Some("OR") {
            3
        } else {
            1
        };
        match w.get(at).map(String::as_str) {
            Some("STREAM") => {
                clauses.kind = Some(ObjectKind::Stream);
                let start = index.offset(tokens[at].span.start);
                chars[start..start + 6].copy_from_slice(&['T', 'A', 'B', 'L', 'E', ' ']);
            }
            Some("TABLE") => clauses.kind = Some(ObjectKind::Table),
            _ => return Err(unexpected(tokens.get(at), "STREAM or TABLE")),
        }
    }
    let mut depth = 0i32;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i].token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            _ => {}
        }
        if depth != 0 {
            i += 1;
            continue;
        }
        let end = match w[i].as_str() {
            "WINDOW" => window_clause(tokens, i, &mut clauses)?,
            "WITHIN" => within_clause(tokens, &w, i, &mut clauses)?,
            "FOR" if w.get(i + 1).map(String::as_str) == Some("SYSTEM_TIME") => {
                as_of_clause(tokens, &w, i, &mut clauses)?
            }
            "EMIT" => emit_clause(tokens, &w, i, &mut clauses)?,
            "PARTITION" if w.get(i + 1).map(String::as_str) == Some("BY") => {
                partition_clause(text, tokens, &w, i, index, &mut clauses)?
            }
            _ => {
                i += 1;
                continue;
            }
        };
        blank(
            chars,
            index.offset(tokens[i].span.start),
            index.offset(tokens[end].span.end),
        );
        i = end + 1;
    }
    Ok(clauses)
}

/// `WINDOW TUMBLING|HOPPING|SESSION ( … )`; the index of its last token.
fn window_clause(tokens: &[TokenWithSpan], at: usize, clauses: &mut Clauses) -> SqlResult<usize> {
    let kind = tokens.get(at + 1).map(|t| word(&t.token)).unwrap_or_default();
    if !matches!(kind.as_str(), "TUMBLING" | "HOPPING" | "SESSION") {
        return Err(unexpected(
            tokens.get(at + 1),
            "TUMBLING, HOPPING or SESSION after WINDOW",
        ));
    }
    if tokens.get(at + 2).map(|t| &t.token) != Some(&Token::LParen) {
        return Err(unexpected(tokens.get(at + 2), "'(' after the window kind"));
    }
    let close = tokens[at + 2..]
        .iter()
        .position(|t| t.token == Token::RParen)
        .map(|p| at + 2 + p)
        .ok_or_else(|| unexpected(None, "')' closing the window"))?;
    let inner = &tokens[at + 3..close];
    let settings = window_settings(inner)?;
    let allowed: &[&str] = match kind.as_str() {
        "TUMBLING" => &["SIZE", "GRACE"],
        "HOPPING" => &["SIZE", "ADVANCE", "GRACE"],
        _ => &["GAP", "GRACE"],
    };
    if let Some(key) = settings.keys().find(|k| !allowed.contains(k)) {
        return Err(SqlError::at(
            format!("a {kind} window takes {}, not {key}", allowed.join(" and ")),
            tokens[at].span.start.line,
            tokens[at].span.start.column,
        ));
    }
    let get = |key: &str| settings.get(key).copied();
    let need = |key: &str| {
        get(key).ok_or_else(|| {
            SqlError::at(
                format!("a {kind} window needs {key}"),
                tokens[at].span.start.line,
                tokens[at].span.start.column,
            )
        })
    };
    let grace_ms = get("GRACE").unwrap_or(DEFAULT_GRACE_MS);
    let window = match kind.as_str() {
        "TUMBLING" => WindowSpec::Tumbling {
            size_ms: need("SIZE")?,
            grace_ms,
        },
        "HOPPING" => WindowSpec::Hopping {
            size_ms: need("SIZE")?,
            advance_ms: need("ADVANCE")?,
            grace_ms,
        },
        _ => WindowSpec::Session {
            gap_ms: need("GAP")?,
            grace_ms,
        },
    };
    if let WindowSpec::Hopping {
        size_ms, advance_ms, ..
    } = window
    {
        if advance_ms > size_ms {
            return Err(SqlError::at(
                "a hopping window's ADVANCE BY must not exceed its SIZE",
                tokens[at].span.start.line,
                tokens[at].span.start.column,
            ));
        }
    }
    if clauses.window.replace(window).is_some() {
        return Err(unexpected(tokens.get(at), "one WINDOW clause"));
    }
    Ok(close)
}

/// `FOR SYSTEM_TIME AS OF [a.]col [HISTORY n unit] [GRACE PERIOD n unit]`
/// after a table's name
/// (sqlparser reads it only in some dialects, and then as any expression;
/// here it names the stream's time column); the index of its last token.
fn as_of_clause(tokens: &[TokenWithSpan], w: &[String], at: usize, clauses: &mut Clauses) -> SqlResult<usize> {
    let table = at
        .checked_sub(1)
        .and_then(|i| name_of(&tokens[i].token))
        .ok_or_else(|| unexpected(tokens.get(at), "a table's name before FOR SYSTEM_TIME AS OF"))?;
    for (i, expected) in [(2, "AS"), (3, "OF")] {
        if w.get(at + i).map(String::as_str) != Some(expected) {
            return Err(unexpected(
                tokens.get(at + i),
                &format!("{expected} in FOR SYSTEM_TIME AS OF"),
            ));
        }
    }
    let ident = |i: usize| match tokens.get(i).map(|t| &t.token) {
        Some(Token::Word(w)) => Ok(ast::Ident {
            value: w.value.clone(),
            quote_style: w.quote_style,
            span: tokens[i].span,
        }),
        _ => Err(unexpected(tokens.get(i), "the stream's time column after AS OF")),
    };
    let mut column = vec![ident(at + 4)?];
    let mut end = at + 4;
    if tokens.get(end + 1).map(|t| &t.token) == Some(&Token::Period) {
        column.push(ident(end + 2)?);
        end += 2;
    }
    let mut history_ms = None;
    if let Some((ms, last)) = span_after(tokens, w, end, &["HISTORY"])? {
        (history_ms, end) = (Some(ms), last);
    }
    let mut grace_ms = 0;
    if let Some((ms, last)) = span_after(tokens, w, end, &["GRACE", "PERIOD"])? {
        (grace_ms, end) = (ms, last);
    }
    clauses.as_of.push(AsOfClause {
        table,
        at: column,
        history_ms,
        grace_ms,
        line: tokens[at].span.start.line,
        column: tokens[at].span.start.column,
    });
    Ok(end)
}

/// `words n unit` right after token `end`, if the first word is there: the
/// span and the index of its last token.
fn span_after(tokens: &[TokenWithSpan], w: &[String], end: usize, words: &[&str]) -> SqlResult<Option<(i64, usize)>> {
    if w.get(end + 1).map(String::as_str) != Some(words[0]) {
        return Ok(None);
    }
    for (i, word) in words.iter().enumerate().skip(1) {
        if w.get(end + 1 + i).map(String::as_str) != Some(*word) {
            return Err(unexpected(
                tokens.get(end + 1 + i),
                &format!("{word} after {}", words[i - 1]),
            ));
        }
    }
    let first = end + 1 + words.len();
    let ms = span_ms(tokens.get(first..(first + 2).min(tokens.len())).unwrap_or_default())?;
    Ok(Some((ms, first + 1)))
}

/// `WITHIN n unit | (n unit, n unit) [GRACE PERIOD n unit]`; the index of
/// its last token (the clause sits between a join's relation and its ON,
/// which sqlparser then reads as if it were not there).
fn within_clause(tokens: &[TokenWithSpan], w: &[String], at: usize, clauses: &mut Clauses) -> SqlResult<usize> {
    let (before_ms, after_ms, mut end) = if tokens.get(at + 1).map(|t| &t.token) == Some(&Token::LParen) {
        let close = tokens[at + 1..]
            .iter()
            .position(|t| t.token == Token::RParen)
            .map(|p| at + 1 + p)
            .ok_or_else(|| unexpected(None, "')' closing WITHIN (before, after)"))?;
        let parts: Vec<&[TokenWithSpan]> = tokens[at + 2..close].split(|t| t.token == Token::Comma).collect();
        let [before, after] = parts[..] else {
            return Err(unexpected(tokens.get(at + 2), "WITHIN (before unit, after unit)"));
        };
        (span_ms(before)?, span_ms(after)?, close)
    } else {
        let ms = span_ms(tokens.get(at + 1..(at + 3).min(tokens.len())).unwrap_or_default())?;
        (ms, ms, at + 2)
    };
    let mut grace_ms = DEFAULT_GRACE_MS;
    if let Some((ms, last)) = span_after(tokens, w, end, &["GRACE", "PERIOD"])? {
        (grace_ms, end) = (ms, last);
    }
    let within = Within {
        before_ms,
        after_ms,
        grace_ms,
    };
    if clauses.within.replace(within).is_some() {
        return Err(unexpected(
            tokens.get(at),
            "one WITHIN clause (one stream–stream join per query)",
        ));
    }
    Ok(end)
}

/// `SIZE n unit`, `ADVANCE BY n unit`, `GRACE PERIOD n unit`, or a session's
/// bare `n unit` (read as GAP), separated by commas.
fn window_settings(inner: &[TokenWithSpan]) -> SqlResult<BTreeMap<&'static str, i64>> {
    let mut settings = BTreeMap::new();
    for part in inner.split(|t| t.token == Token::Comma) {
        let w: Vec<String> = part.iter().map(|t| word(&t.token)).collect();
        let (key, skip) = match w.first().map(String::as_str) {
            Some("SIZE") => ("SIZE", 1),
            Some("ADVANCE") if w.get(1).map(String::as_str) == Some("BY") => ("ADVANCE", 2),
            Some("GRACE") if w.get(1).map(String::as_str) == Some("PERIOD") => ("GRACE", 2),
            Some("") => ("GAP", 0),
            _ => return Err(unexpected(part.first(), "SIZE, ADVANCE BY or GRACE PERIOD")),
        };
        // A grace may be zero (as in ksqlDB); sizes, advances and gaps not.
        let ms = if key == "GRACE" {
            span_ms(&part[skip..])?
        } else {
            duration_ms(&part[skip..])?
        };
        if settings.insert(key, ms).is_some() {
            return Err(unexpected(part.first(), &format!("{key} once")));
        }
    }
    Ok(settings)
}

/// `n unit` in milliseconds, `n` at least 1.
fn duration_ms(tokens: &[TokenWithSpan]) -> SqlResult<i64> {
    match span_ms(tokens)? {
        0 => Err(unexpected(tokens.first(), "a positive whole number")),
        ms => Ok(ms),
    }
}

/// `n unit` in milliseconds, `n` at least 0 (a grace, a join window's side).
fn span_ms(tokens: &[TokenWithSpan]) -> SqlResult<i64> {
    let n: i64 = match tokens.first().map(|t| &t.token) {
        Some(Token::Number(n, _)) => n
            .parse()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| unexpected(tokens.first(), "a whole number"))?,
        _ => return Err(unexpected(tokens.first(), "a number")),
    };
    let unit_ms: i64 = match tokens.get(1).map(|t| word(&t.token)).as_deref() {
        Some("MILLISECOND" | "MILLISECONDS") => 1,
        Some("SECOND" | "SECONDS") => 1_000,
        Some("MINUTE" | "MINUTES") => 60_000,
        Some("HOUR" | "HOURS") => 3_600_000,
        Some("DAY" | "DAYS") => 86_400_000,
        _ => {
            return Err(unexpected(
                tokens.get(1),
                "a unit (MILLISECONDS, SECONDS, MINUTES, HOURS or DAYS)",
            ))
        }
    };
    if tokens.len() > 2 {
        return Err(unexpected(tokens.get(2), "',' or ')'"));
    }
    n.checked_mul(unit_ms)
        .filter(|ms| *ms <= 365 * 86_400_000)
        .ok_or_else(|| unexpected(tokens.first(), "a duration of at most 365 days"))
}

/// `EMIT CHANGES|FINAL`.
fn emit_clause(tokens: &[TokenWithSpan], w: &[String], at: usize, clauses: &mut Clauses) -> SqlResult<usize> {
    let emit = match w.get(at + 1).map(String::as_str) {
        Some("CHANGES") => EmitMode::Changes,
        Some("FINAL") => EmitMode::Final,
        _ => return Err(unexpected(tokens.get(at + 1), "CHANGES or FINAL after EMIT")),
    };
    clauses.emit = Some(emit);
    Ok(at + 1)
}

/// `PARTITION BY expr, …` up to EMIT, LIMIT or the end.
fn partition_clause(
    text: &str,
    tokens: &[TokenWithSpan],
    w: &[String],
    at: usize,
    index: &LineIndex,
    clauses: &mut Clauses,
) -> SqlResult<usize> {
    let mut end = at + 1;
    while end + 1 < tokens.len() && !matches!(w[end + 1].as_str(), "EMIT" | "LIMIT") {
        end += 1;
    }
    if end == at + 1 {
        return Err(unexpected(tokens.get(at + 2), "an expression after PARTITION BY"));
    }
    let chars: Vec<char> = text.chars().collect();
    let from = index.offset(tokens[at + 2].span.start);
    let to = index.offset(tokens[end].span.end);
    // Padded so that sqlparser's positions are the statement's.
    let mut padded: Vec<char> = chars.iter().map(|c| if *c == '\n' { '\n' } else { ' ' }).collect();
    padded[from..to].copy_from_slice(&chars[from..to]);
    let padded: String = padded.iter().collect();
    let mut parser = Parser::new(&GenericDialect {})
        .try_with_sql(&padded)
        .map_err(|e| SqlError::from_parser(e.to_string()))?;
    clauses.partition_by = parser
        .parse_comma_separated(Parser::parse_expr)
        .map_err(|e| SqlError::from_parser(e.to_string()))?;
    Ok(end)
}

fn blank(chars: &mut [char], from: usize, to: usize) {
    let to = to.min(chars.len());
    for c in &mut chars[from..to] {
        if *c != '\n' {
            *c = ' ';
        }
    }
}

/// Character offsets of tokens' line and column positions.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(chars: &[char]) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(
            chars
                .iter()
                .enumerate()
                .filter(|(_, c)| **c == '\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { starts }
    }

    fn offset(&self, at: Location) -> usize {
        let line = (at.line.max(1) - 1) as usize;
        self.starts.get(line).copied().unwrap_or(0) + (at.column.max(1) - 1) as usize
    }
}

/// sqlparser's statement into ours.
fn convert(statement: ast::Statement, clauses: Clauses) -> SqlResult<Statement> {
    match statement {
        ast::Statement::CreateTable(create) => create_statement(create, clauses),
        ast::Statement::Insert(insert) => insert_statement(insert, clauses),
        ast::Statement::Query(query) => Ok(Statement::Select(query_of(*query, clauses)?)),
        ast::Statement::Explain { statement, .. } => match *statement {
            ast::Statement::Query(query) => Ok(Statement::ExplainQuery(query_of(*query, clauses)?)),
            other => Err(SqlError::new(format!(
                "EXPLAIN takes a query id or a SELECT, not {other}"
            ))),
        },
        other => Err(SqlError::new(format!(
            "statement not supported: {}",
            other
                .to_string()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        ))),
    }
}

fn single_name(name: &ast::ObjectName) -> SqlResult<ast::Ident> {
    match &name.0[..] {
        [ast::ObjectNamePart::Identifier(ident)] => Ok(ident.clone()),
        _ => Err(SqlError::new(format!("{name} is not a plain name"))),
    }
}

fn with_options(options: &ast::CreateTableOptions) -> SqlResult<With> {
    let mut with = With::default();
    let list = match options {
        ast::CreateTableOptions::None => return Ok(with),
        ast::CreateTableOptions::With(list) => list,
        _ => return Err(SqlError::new("table options other than WITH (…) are not supported")),
    };
    for option in list {
        match option {
            ast::SqlOption::KeyValue { key, value } => {
                with.0.insert(key.value.to_ascii_uppercase(), value.clone());
            }
            other => return Err(SqlError::new(format!("WITH takes KEY=value pairs, not {other}"))),
        }
    }
    Ok(with)
}

fn create_statement(create: ast::CreateTable, clauses: Clauses) -> SqlResult<Statement> {
    let kind = clauses.kind.unwrap_or(ObjectKind::Table);
    let name = single_name(&create.name)?;
    let with = with_options(&create.table_options)?;
    match create.query {
        Some(query) => {
            if !create.columns.is_empty() {
                return Err(SqlError::new("CREATE … AS SELECT takes its columns from the SELECT"));
            }
            Ok(Statement::CreateAs {
                kind,
                name,
                with,
                query: query_of(*query, clauses)?,
            })
        }
        None => {
            if clauses.window.is_some()
                || clauses.emit.is_some()
                || clauses.within.is_some()
                || !clauses.as_of.is_empty()
            {
                return Err(SqlError::new(
                    "WINDOW, WITHIN, FOR SYSTEM_TIME AS OF and EMIT belong to a SELECT",
                ));
            }
            Ok(Statement::CreateSource {
                kind,
                name,
                columns: create.columns,
                with,
            })
        }
    }
}

fn insert_statement(insert: ast::Insert, clauses: Clauses) -> SqlResult<Statement> {
    let ast::TableObject::TableName(name) = &insert.table else {
        return Err(SqlError::new("INSERT INTO takes a stream's name"));
    };
    let target = single_name(name)?;
    let Some(source) = insert.source else {
        return Err(SqlError::new("INSERT INTO needs VALUES (…) or a SELECT"));
    };
    if let ast::SetExpr::Values(values) = *source.body {
        return Ok(Statement::InsertValues {
            target,
            columns: insert.columns,
            rows: values.rows,
        });
    }
    Ok(Statement::InsertSelect {
        target,
        query: query_of(*source, clauses)?,
    })
}

fn query_of(query: ast::Query, clauses: Clauses) -> SqlResult<Query> {
    if query.with.is_some() || query.order_by.is_some() || query.fetch.is_some() {
        return Err(SqlError::new("WITH, ORDER BY and FETCH are not supported on streams"));
    }
    let limit = match &query.limit_clause {
        None => None,
        Some(ast::LimitClause::LimitOffset {
            limit: Some(ast::Expr::Value(v)),
            offset: None,
            ..
        }) => match &v.value {
            ast::Value::Number(n, _) => Some(
                n.parse()
                    .map_err(|_| SqlError::new(format!("LIMIT {n} is not a count")))?,
            ),
            other => return Err(SqlError::new(format!("LIMIT takes a count, not {other}"))),
        },
        Some(other) => return Err(SqlError::new(format!("unsupported limit: {other}"))),
    };
    let ast::SetExpr::Select(select) = *query.body else {
        return Err(SqlError::new(
            "only a plain SELECT is supported (no UNION, VALUES or subquery)",
        ));
    };
    Ok(Query {
        select,
        window: clauses.window,
        emit: clauses.emit,
        partition_by: clauses.partition_by,
        limit,
        within: clauses.within,
        as_of: clauses.as_of,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "CREATE STREAM possible_fraud AS
  SELECT card_number, count(*) FROM authorization_attempts
  WINDOW TUMBLING (SIZE 5 MINUTE)
  GROUP BY card_number HAVING count(*) > 3;";

    #[test]
    fn the_seed_statement_parses_with_its_window() {
        let parsed = parse_script(SEED);
        assert_eq!(parsed.len(), 1);
        let parsed = parsed.into_iter().next().expect("one").1.expect("parses");
        let Statement::CreateAs { kind, name, query, .. } = parsed.statement else {
            panic!("{:?}", parsed.statement)
        };
        assert_eq!((kind, name.value.as_str()), (ObjectKind::Stream, "possible_fraud"));
        assert_eq!(
            query.window,
            Some(WindowSpec::Tumbling {
                size_ms: 300_000,
                grace_ms: DEFAULT_GRACE_MS
            })
        );
        assert!(query.select.having.is_some());
    }

    #[test]
    fn ksql_clauses_and_commands() {
        let script = "SELECT * FROM s WINDOW HOPPING (SIZE 1 HOUR, ADVANCE BY 5 MINUTES, GRACE PERIOD 1 SECOND) \
            GROUP BY a EMIT FINAL LIMIT 3; SHOW streams; describe x extended; DROP TABLE IF EXISTS t DELETE TOPIC; \
            TERMINATE q1; SELECT a FROM s PARTITION BY a, b EMIT CHANGES; SELECT * FROM s WINDOW SESSION (30 SECONDS) GROUP BY a";
        let parsed: Vec<Parsed> = parse_script(script)
            .into_iter()
            .map(|(_, p)| p.expect("parses"))
            .collect();
        let Statement::Select(q) = &parsed[0].statement else {
            panic!()
        };
        assert_eq!(
            q.window,
            Some(WindowSpec::Hopping {
                size_ms: 3_600_000,
                advance_ms: 300_000,
                grace_ms: 1_000
            })
        );
        assert_eq!((q.emit, q.limit), (Some(EmitMode::Final), Some(3)));
        assert!(matches!(parsed[1].statement, Statement::Show(Listing::Streams)));
        assert!(matches!(&parsed[2].statement, Statement::Describe { name, extended: true } if name == "X"));
        assert!(
            matches!(&parsed[3].statement, Statement::Drop { name, if_exists: true, delete_topic: true, .. } if name == "T")
        );
        assert!(matches!(&parsed[4].statement, Statement::Terminate(q) if q == "Q1"));
        let Statement::Select(q) = &parsed[5].statement else {
            panic!()
        };
        assert_eq!(q.partition_by.len(), 2);
        let Statement::Select(q) = &parsed[6].statement else {
            panic!()
        };
        assert!(matches!(q.window, Some(WindowSpec::Session { gap_ms: 30_000, .. })));
    }

    #[test]
    fn terminate_all_and_show_properties() {
        let parsed: Vec<Parsed> = parse_script("TERMINATE ALL; terminate \"ALL\"; LIST PROPERTIES; SHOW properties")
            .into_iter()
            .map(|(_, p)| p.expect("parses"))
            .collect();
        assert!(matches!(parsed[0].statement, Statement::TerminateAll));
        assert!(
            matches!(&parsed[1].statement, Statement::Terminate(q) if q == "ALL"),
            "quoted, a name"
        );
        assert!(matches!(parsed[2].statement, Statement::Show(Listing::Properties)));
        assert!(matches!(parsed[3].statement, Statement::Show(Listing::Properties)));
    }

    #[test]
    fn an_error_in_a_later_statement_points_into_that_statement() {
        let script = "SHOW STREAMS;\nSHOW TABLES;\nSELECT a\n  FROM s WHERE = 1;";
        let parsed = parse_script(script);
        let (text, error) = (&parsed[2].0, parsed[2].1.as_ref().expect_err("refused"));
        assert_eq!(text, "SELECT a\n  FROM s WHERE = 1");
        let rendered = error.render(text);
        assert!(
            rendered.contains("\n    FROM s WHERE = 1\n"),
            "the caret's line is the statement's: {rendered}"
        );
    }

    #[test]
    fn a_syntax_error_points_at_its_line_and_column() {
        let err = parse_statement("SELECT a,\n  b FROM s WHERE = 3").expect_err("refused");
        let position = err.position.expect("a position");
        assert_eq!(position.line, 2, "{err}");
        let rendered = err.render("SELECT a,\n  b FROM s WHERE = 3");
        assert!(rendered.contains("b FROM s WHERE = 3\n"), "{rendered}");
        let err = parse_statement("SELECT * FROM s WINDOW TUMBLING (SIZE 5 FORTNIGHTS) GROUP BY a").expect_err("unit");
        assert!(err.message.contains("unit"), "{err}");
        assert_eq!(err.position.map(|p| p.column), Some(41), "{err}");
        let err = parse_statement("SHOW FOO").expect_err("listing");
        assert!(err.message.contains("STREAMS"), "{err}");
    }
}

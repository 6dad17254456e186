//! Errors of the SQL front end, with where in the statement they are.

use std::fmt;

/// A position in a statement's text, from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

/// Why a statement was refused. It changed nothing in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlError {
    pub message: String,
    pub position: Option<Position>,
}

impl SqlError {
    pub fn new(message: impl Into<String>) -> SqlError {
        SqlError {
            message: message.into(),
            position: None,
        }
    }

    pub fn at(message: impl Into<String>, line: u64, column: u64) -> SqlError {
        SqlError {
            message: message.into(),
            position: (line > 0).then_some(Position { line, column }),
        }
    }

    /// From a sqlparser error, whose message ends `at Line: L, Column: C`.
    pub fn from_parser(message: String) -> SqlError {
        let message = message.trim_start_matches("sql parser error: ").to_string();
        if message.contains("recursion limit exceeded") {
            return SqlError::new("the statement nests too deep (sqlparser's recursion limit, 50 levels)");
        }
        let Some(at) = message.rfind(" at Line: ") else {
            return SqlError::new(message);
        };
        let numbers: Vec<u64> = message[at..]
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        match numbers[..] {
            [line, column] => SqlError::at(&message[..at], line, column),
            _ => SqlError::new(message),
        }
    }

    /// The error with the statement's line and a caret under the column.
    pub fn render(&self, statement: &str) -> String {
        let Some(Position { line, column }) = self.position else {
            return self.message.clone();
        };
        let Some(text) = statement.lines().nth(line.saturating_sub(1) as usize) else {
            return format!("{} (line {line}, column {column})", self.message);
        };
        let pad = " ".repeat(column.saturating_sub(1) as usize);
        format!("{} (line {line}, column {column})\n  {text}\n  {pad}^", self.message)
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(Position { line, column }) => write!(f, "{} (line {line}, column {column})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for SqlError {}

pub type SqlResult<T> = Result<T, SqlError>;

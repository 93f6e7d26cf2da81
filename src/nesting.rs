//! Where a JSON document read byte by byte is: the kinds of the open containers, innermost
//! last. Shared by the streaming scanners of request bodies (the prompt-text counter, the
//! reference scanner), which must know whether a string is a key without parsing the document.

/// Nesting tracked exactly; deeper levels are only counted (a hostile body cannot make the
/// stack grow without bound).
const MAX_STACK: usize = 4096;

/// The open containers of a document (`true` = object).
#[derive(Debug, Default)]
pub struct Nesting {
    stack: Vec<bool>,
    deep: u64,
}

impl Nesting {
    /// How many containers are open.
    pub fn depth(&self) -> u64 {
        self.stack.len() as u64 + self.deep
    }

    /// Whether the innermost open container is an object (its next string may be a key).
    pub fn in_object(&self) -> bool {
        self.deep == 0 && self.stack.last() == Some(&true)
    }

    /// A container opens (`{` is an object, `[` is not).
    pub fn push(&mut self, object: bool) {
        if self.deep > 0 || self.stack.len() >= MAX_STACK {
            self.deep = self.deep.saturating_add(1);
        } else {
            self.stack.push(object);
        }
    }

    /// The innermost container closes.
    pub fn pop(&mut self) {
        if self.deep > 0 {
            self.deep -= 1;
        } else {
            self.stack.pop();
        }
    }
}

//! The two sites the link joins.

use std::fmt;

/// One of the two sites the link joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    Onprem,
    Azure,
}

impl Site {
    pub fn as_str(self) -> &'static str {
        match self {
            Site::Onprem => "onprem",
            Site::Azure => "azure",
        }
    }

    /// The site across the link.
    pub fn other(self) -> Site {
        match self {
            Site::Onprem => Site::Azure,
            Site::Azure => Site::Onprem,
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

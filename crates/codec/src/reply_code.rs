//! AMQP 0-9-1 reply codes, with the spec's names.
//!
//! Every close warren sends itself carries one of these; a broker's own code (forwarded as it
//! came) stays a plain `u16`, since a broker may use one this table does not know.

use std::fmt;

/// A reply code of connection.close, channel.close or basic.return (AMQP 0-9-1, section 1.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ReplyCode {
    Ok = 200,
    ContentTooLarge = 311,
    NoRoute = 312,
    NoConsumers = 313,
    ConnectionForced = 320,
    InvalidPath = 402,
    AccessRefused = 403,
    NotFound = 404,
    ResourceLocked = 405,
    PreconditionFailed = 406,
    FrameError = 501,
    SyntaxError = 502,
    CommandInvalid = 503,
    ChannelError = 504,
    UnexpectedFrame = 505,
    ResourceError = 506,
    NotAllowed = 530,
    NotImplemented = 540,
    InternalError = 541,
}

impl ReplyCode {
    pub const ALL: [ReplyCode; 19] = [
        ReplyCode::Ok,
        ReplyCode::ContentTooLarge,
        ReplyCode::NoRoute,
        ReplyCode::NoConsumers,
        ReplyCode::ConnectionForced,
        ReplyCode::InvalidPath,
        ReplyCode::AccessRefused,
        ReplyCode::NotFound,
        ReplyCode::ResourceLocked,
        ReplyCode::PreconditionFailed,
        ReplyCode::FrameError,
        ReplyCode::SyntaxError,
        ReplyCode::CommandInvalid,
        ReplyCode::ChannelError,
        ReplyCode::UnexpectedFrame,
        ReplyCode::ResourceError,
        ReplyCode::NotAllowed,
        ReplyCode::NotImplemented,
        ReplyCode::InternalError,
    ];

    /// The number on the wire.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The spec's name, as RabbitMQ writes it at the start of a reply text
    /// (`"NOT_FOUND - no queue 'x'"`).
    pub const fn name(self) -> &'static str {
        match self {
            ReplyCode::Ok => "OK",
            ReplyCode::ContentTooLarge => "CONTENT_TOO_LARGE",
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::NoConsumers => "NO_CONSUMERS",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::InvalidPath => "INVALID_PATH",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::FrameError => "FRAME_ERROR",
            ReplyCode::SyntaxError => "SYNTAX_ERROR",
            ReplyCode::CommandInvalid => "COMMAND_INVALID",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ReplyCode::ResourceError => "RESOURCE_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// The code for a number, if the spec names it.
    pub fn from_code(code: u16) -> Option<ReplyCode> {
        ReplyCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// A reply text in RabbitMQ's form: the name, " - ", the detail.
    pub fn text(self, detail: impl fmt::Display) -> String {
        format!("{} - {detail}", self.name())
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.name())
    }
}

impl From<ReplyCode> for u16 {
    fn from(c: ReplyCode) -> u16 {
        c.code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for c in ReplyCode::ALL {
            assert_eq!(ReplyCode::from_code(c.code()), Some(c));
            assert!(
                c.name()
                    .chars()
                    .all(|ch| ch.is_ascii_uppercase() || ch == '_')
            );
        }
        assert_eq!(ReplyCode::from_code(999), None);
        assert_eq!(ReplyCode::NotFound.code(), 404);
        assert_eq!(
            ReplyCode::PreconditionFailed.text("unknown delivery tag 3"),
            "PRECONDITION_FAILED - unknown delivery tag 3"
        );
        assert_eq!(ReplyCode::ChannelError.to_string(), "504 CHANNEL_ERROR");
    }
}

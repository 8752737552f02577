//! tidepool-tiering

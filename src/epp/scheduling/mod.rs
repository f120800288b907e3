//! Scheduling: filters, scorers, pickers and profiles configured by EndpointPickerConfig.

"""A tiny sign-up site: one view and one management command that send mail through Hato."""

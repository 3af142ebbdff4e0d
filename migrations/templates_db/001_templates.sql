CREATE TABLE IF NOT EXISTS templates (
    code              text PRIMARY KEY,
    notification_type text NOT NULL CHECK (notification_type IN ('email', 'push')),
    default_language  text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

-- One row per language of a template: which version is live.
CREATE TABLE IF NOT EXISTS template_languages (
    code           text NOT NULL REFERENCES templates (code) ON DELETE CASCADE,
    language       text NOT NULL,
    active_version integer NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (code, language)
);

-- Versions are immutable: an update inserts, a rollback moves active_version.
CREATE TABLE IF NOT EXISTS template_versions (
    code       text NOT NULL,
    language   text NOT NULL,
    version    integer NOT NULL,
    subject    text,
    body       text NOT NULL,
    text_body  text,
    title      text,
    image_url  text,
    link       text,
    created_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (code, language, version),
    FOREIGN KEY (code, language) REFERENCES template_languages (code, language) ON DELETE CASCADE
);

-- Templates belong to a project (issue 25): the same code in two projects is two templates.
-- Every existing template, language and version is project `default`'s.
ALTER TABLE template_versions DROP CONSTRAINT IF EXISTS template_versions_code_language_fkey;
ALTER TABLE template_languages DROP CONSTRAINT IF EXISTS template_languages_code_fkey;

ALTER TABLE templates ADD COLUMN IF NOT EXISTS project_id text NOT NULL DEFAULT 'default';
ALTER TABLE template_languages ADD COLUMN IF NOT EXISTS project_id text NOT NULL DEFAULT 'default';
ALTER TABLE template_versions ADD COLUMN IF NOT EXISTS project_id text NOT NULL DEFAULT 'default';

ALTER TABLE templates DROP CONSTRAINT templates_pkey, ADD PRIMARY KEY (project_id, code);
ALTER TABLE template_languages DROP CONSTRAINT template_languages_pkey,
    ADD PRIMARY KEY (project_id, code, language),
    ADD FOREIGN KEY (project_id, code) REFERENCES templates (project_id, code) ON DELETE CASCADE;
ALTER TABLE template_versions DROP CONSTRAINT template_versions_pkey,
    ADD PRIMARY KEY (project_id, code, language, version),
    ADD FOREIGN KEY (project_id, code, language)
        REFERENCES template_languages (project_id, code, language) ON DELETE CASCADE;

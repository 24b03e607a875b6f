-- Everything the keyhippo extension put into the current database, one line per object or
-- property, sorted, without OIDs or anything else that differs between two databases built the
-- same way: what a database updated with ALTER EXTENSION keyhippo UPDATE must show exactly as a
-- fresh CREATE EXTENSION keyhippo does (tests/upgrade.sh compares the two).
--
-- Covered: the extension's member objects and its dump-configuration tables; schemas; tables,
-- views, sequences and indexes with their options, row security, privileges and comments; the
-- columns in order with type, nullability, default, identity, privileges and comments;
-- constraints; index definitions; view definitions; sequences' parameters; functions and
-- procedures with their full definition (language, volatility, security, settings, body),
-- owner, privileges and comments; types and enum labels in order; policies; triggers, also
-- those keyhippo puts on other schemas' tables (auth.users); event triggers; rules; default
-- privileges in keyhippo's schemas.
WITH ext AS (
    SELECT oid, extconfig, extcondition FROM pg_catalog.pg_extension WHERE extname = 'keyhippo'
), nsp AS (
    SELECT oid, nspname FROM pg_catalog.pg_namespace
     WHERE nspname IN ('keyhippo', 'keyhippo_rbac', 'keyhippo_internal', 'keyhippo_impersonation')
), rel AS (
    SELECT c.* FROM pg_catalog.pg_class c WHERE c.relnamespace IN (SELECT oid FROM nsp)
), fn AS (
    SELECT p.* FROM pg_catalog.pg_proc p WHERE p.pronamespace IN (SELECT oid FROM nsp)
)
SELECT line FROM (
    SELECT 'member ' || pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid) AS line
      FROM pg_catalog.pg_depend d, ext
     WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
       AND d.refobjid = ext.oid AND d.deptype = 'e'
    UNION ALL
    SELECT 'dump-config ' || c::pg_catalog.regclass::text || ' where=' || COALESCE(w, '')
      FROM ext, LATERAL unnest(ext.extconfig, ext.extcondition) AS u(c, w)
    UNION ALL
    SELECT 'schema ' || n.nspname || ' owner=' || pg_catalog.pg_get_userbyid(n.nspowner)
           || ' acl=' || COALESCE(n.nspacl::text, '-')
           || ' comment=' || COALESCE(pg_catalog.obj_description(n.oid, 'pg_namespace'), '-')
      FROM pg_catalog.pg_namespace n WHERE n.oid IN (SELECT oid FROM nsp)
    UNION ALL
    SELECT 'relation ' || c.oid::pg_catalog.regclass::text || ' kind=' || c.relkind::text
           || ' persistence=' || c.relpersistence::text || ' owner=' || pg_catalog.pg_get_userbyid(c.relowner)
           || ' rls=' || c.relrowsecurity || '/' || c.relforcerowsecurity
           || ' replica-identity=' || c.relreplident::text
           || ' options=' || COALESCE(c.reloptions::text, '-')
           || ' am=' || COALESCE((SELECT amname FROM pg_catalog.pg_am WHERE oid = c.relam), '-')
           || ' acl=' || COALESCE(c.relacl::text, '-')
           || ' comment=' || COALESCE(pg_catalog.obj_description(c.oid, 'pg_class'), '-')
      FROM rel c
    UNION ALL
    SELECT 'column ' || a.attrelid::pg_catalog.regclass::text || ' #'
           || row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum)
           || ' ' || a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
           || ' notnull=' || a.attnotnull
           || ' default=' || COALESCE(pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), '-')
           || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
           || ' collation=' || COALESCE((SELECT collname FROM pg_catalog.pg_collation WHERE oid = a.attcollation), '-')
           || ' acl=' || COALESCE(a.attacl::text, '-')
           || ' comment=' || COALESCE(pg_catalog.col_description(a.attrelid, a.attnum), '-')
      FROM pg_catalog.pg_attribute a
      JOIN rel c ON c.oid = a.attrelid
      LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
     WHERE a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT 'constraint ' || CASE WHEN co.conrelid <> 0 THEN co.conrelid::pg_catalog.regclass::text
                                 ELSE co.contypid::pg_catalog.regtype::text END
           || ' ' || co.conname || ' ' || pg_catalog.pg_get_constraintdef(co.oid)
           || ' comment=' || COALESCE(pg_catalog.obj_description(co.oid, 'pg_constraint'), '-')
      FROM pg_catalog.pg_constraint co
     WHERE co.connamespace IN (SELECT oid FROM nsp)
    UNION ALL
    SELECT 'index ' || pg_catalog.pg_get_indexdef(i.indexrelid)
           || ' clustered=' || i.indisclustered || ' replident=' || i.indisreplident
      FROM pg_catalog.pg_index i JOIN rel c ON c.oid = i.indrelid
    UNION ALL
    SELECT 'view ' || c.oid::pg_catalog.regclass::text || ' '
           || regexp_replace(pg_catalog.pg_get_viewdef(c.oid), '\s+', ' ', 'g')
      FROM rel c WHERE c.relkind::text IN ('v', 'm')
    UNION ALL
    SELECT 'sequence ' || s.seqrelid::pg_catalog.regclass::text || ' ' || pg_catalog.format_type(s.seqtypid, NULL)
           || ' ' || s.seqstart || ' ' || s.seqincrement || ' ' || s.seqmax || ' ' || s.seqmin
           || ' ' || s.seqcache || ' ' || s.seqcycle
      FROM pg_catalog.pg_sequence s JOIN rel c ON c.oid = s.seqrelid
    UNION ALL
    SELECT 'function ' || p.oid::pg_catalog.regprocedure::text
           || ' owner=' || pg_catalog.pg_get_userbyid(p.proowner)
           || ' acl=' || COALESCE(p.proacl::text, '-')
           || ' comment=' || COALESCE(pg_catalog.obj_description(p.oid, 'pg_proc'), '-')
           || ' definition=' || CASE WHEN p.prokind = 'a' THEN 'aggregate'
                                     ELSE regexp_replace(pg_catalog.pg_get_functiondef(p.oid), '\s+', ' ', 'g') END
           || ' cost=' || p.procost || ' rows=' || p.prorows
      FROM fn p
    UNION ALL
    SELECT 'type ' || t.oid::pg_catalog.regtype::text || ' kind=' || t.typtype::text
           || ' owner=' || pg_catalog.pg_get_userbyid(t.typowner)
           || ' acl=' || COALESCE(t.typacl::text, '-')
           || ' labels=' || COALESCE((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                                        FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid), '-')
           || ' comment=' || COALESCE(pg_catalog.obj_description(t.oid, 'pg_type'), '-')
      FROM pg_catalog.pg_type t
     WHERE t.typnamespace IN (SELECT oid FROM nsp) AND t.typcategory <> 'A'
       AND (t.typrelid = 0 OR (SELECT relkind FROM pg_catalog.pg_class WHERE oid = t.typrelid) = 'c')
    UNION ALL
    SELECT 'policy ' || pol.schemaname || '.' || pol.tablename || ' ' || pol.policyname
           || ' ' || pol.permissive || ' ' || pol.roles::text || ' ' || pol.cmd
           || ' using=' || COALESCE(pol.qual, '-') || ' check=' || COALESCE(pol.with_check, '-')
      FROM pg_catalog.pg_policies pol
     WHERE pol.schemaname IN (SELECT nspname FROM nsp)
    UNION ALL
    SELECT 'trigger ' || pg_catalog.pg_get_triggerdef(tg.oid) || ' enabled=' || tg.tgenabled::text
      FROM pg_catalog.pg_trigger tg
     WHERE NOT tg.tgisinternal
       AND (tg.tgrelid IN (SELECT oid FROM rel) OR tg.tgfoid IN (SELECT oid FROM fn))
    UNION ALL
    SELECT 'event-trigger ' || et.evtname || ' on=' || et.evtevent
           || ' function=' || et.evtfoid::pg_catalog.regproc::text || ' enabled=' || et.evtenabled::text
           || ' tags=' || COALESCE(et.evttags::text, '-')
      FROM pg_catalog.pg_event_trigger et
     WHERE et.evtfoid IN (SELECT oid FROM fn)
    UNION ALL
    SELECT 'rule ' || r.ev_class::pg_catalog.regclass::text || ' ' || r.rulename || ' '
           || regexp_replace(pg_catalog.pg_get_ruledef(r.oid), '\s+', ' ', 'g')
      FROM pg_catalog.pg_rewrite r
     WHERE r.ev_class IN (SELECT oid FROM rel) AND r.rulename <> '_RETURN'
    UNION ALL
    SELECT 'default-acl ' || COALESCE((SELECT nspname FROM nsp WHERE oid = da.defaclnamespace), '-')
           || ' ' || pg_catalog.pg_get_userbyid(da.defaclrole) || ' ' || da.defaclobjtype::text
           || ' ' || da.defaclacl::text
      FROM pg_catalog.pg_default_acl da
     WHERE da.defaclnamespace IN (SELECT oid FROM nsp)
) lines
ORDER BY line COLLATE "C";

#include "client/cli_flags.h"

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace blockd {

FlagSet::FlagSet(std::string usage, std::string description)
    : usage_(std::move(usage)), description_(std::move(description)) {}

void FlagSet::Add(const char* name, Type type, void* value, const char* help, std::string default_text) {
  flags_.push_back({name, type, value, help, std::move(default_text), section_, false});
}

void FlagSet::String(const char* name, std::string* value, const char* help) {
  Add(name, Type::kString, value, help, value->empty() ? "" : absl::StrCat("\"", *value, "\""));
}
void FlagSet::Int(const char* name, int64_t* value, const char* help) {
  Add(name, Type::kInt, value, help, absl::StrCat(*value));
}
void FlagSet::Double(const char* name, double* value, const char* help) {
  Add(name, Type::kDouble, value, help, absl::StrCat(*value));
}
void FlagSet::Bool(const char* name, bool* value, const char* help) {
  Add(name, Type::kBool, value, help, *value ? "true" : "false");
}
void FlagSet::Duration(const char* name, absl::Duration* value, const char* help) {
  Add(name, Type::kDuration, value, help, absl::FormatDuration(*value));
}
void FlagSet::Section(const char* title) { section_ = title; }

FlagSet::Flag* FlagSet::Find(const std::string& name) {
  for (Flag& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

const FlagSet::Flag* FlagSet::Find(const std::string& name) const {
  for (const Flag& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

std::string FlagSet::CanonicalName(std::string name) {
  for (char& c : name) {
    if (c == '-') c = '_';
  }
  return name;
}

bool FlagSet::IsSet(const std::string& name) const {
  const Flag* f = Find(CanonicalName(name));
  return f != nullptr && f->set;
}

bool FlagSet::TakesValue(const std::string& name) const {
  const Flag* f = Find(CanonicalName(name));
  return f != nullptr && f->type != Type::kBool;
}

absl::Status FlagSet::Assign(Flag& f, const std::string& text) {
  auto bad = [&](absl::string_view expected) {
    return absl::InvalidArgumentError(absl::StrCat("--", f.name, "=", text, ": expected ", expected));
  };
  switch (f.type) {
    case Type::kString: *static_cast<std::string*>(f.value) = text; break;
    case Type::kInt:
      if (!absl::SimpleAtoi(text, static_cast<int64_t*>(f.value))) return bad("an integer");
      break;
    case Type::kDouble:
      if (!absl::SimpleAtod(text, static_cast<double*>(f.value))) return bad("a number");
      break;
    case Type::kBool: {
      const std::string t = absl::AsciiStrToLower(text);
      if (t == "true" || t == "1" || t == "yes") {
        *static_cast<bool*>(f.value) = true;
      } else if (t == "false" || t == "0" || t == "no") {
        *static_cast<bool*>(f.value) = false;
      } else {
        return bad("true or false");
      }
      break;
    }
    case Type::kDuration: {
      auto* d = static_cast<absl::Duration*>(f.value);
      double seconds;
      if (text == "inf" || text == "0") {
        *d = absl::InfiniteDuration();
      } else if (absl::SimpleAtod(text, &seconds) && seconds > 0) {
        *d = absl::Seconds(seconds);
      } else if (!absl::ParseDuration(text, d) || *d <= absl::ZeroDuration()) {
        return bad("a duration such as 30s, 2m or 500ms (or a number of seconds)");
      }
      break;
    }
  }
  f.set = true;
  return absl::OkStatus();
}

absl::Status FlagSet::Parse(const std::vector<std::string>& args, std::vector<std::string>* positional) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--") {
      positional->insert(positional->end(), args.begin() + static_cast<long>(i) + 1, args.end());
      break;
    }
    if (a.size() < 2 || a[0] != '-' || (a[1] >= '0' && a[1] <= '9') || a[1] == '.') {
      positional->push_back(a);  // includes negative numbers
      continue;
    }
    std::string body = a.substr(a[1] == '-' ? 2 : 1);
    if (body == "help" || body == "h") {
      help_ = true;
      continue;
    }
    std::string name = body, value;
    const size_t eq = body.find('=');
    const bool has_value = eq != std::string::npos;
    if (has_value) {
      name = body.substr(0, eq);
      value = body.substr(eq + 1);
    }
    name = CanonicalName(name);
    Flag* f = Find(name);
    if (f == nullptr && !has_value && name.rfind("no", 0) == 0) {
      // --noflag, and --no-flag (--no_flag once canonical)
      Flag* negated = Find(name.substr(2));
      if (negated == nullptr && name.rfind("no_", 0) == 0) negated = Find(name.substr(3));
      if (negated != nullptr && negated->type == Type::kBool) {
        *static_cast<bool*>(negated->value) = false;
        negated->set = true;
        continue;
      }
    }
    if (f == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, " (see --help)"));
    }
    if (!has_value) {
      if (f->type == Type::kBool) {
        value = "true";
      } else if (i + 1 < args.size()) {
        value = args[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
    }
    absl::Status s = Assign(*f, value);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

std::string FlagSet::Help() const {
  std::string out = absl::StrCat("usage: ", usage_, "\n\n", description_, "\n");
  std::string section = "\x01";
  for (const Flag& f : flags_) {
    if (f.section != section) {
      section = f.section;
      absl::StrAppend(&out, "\n", section.empty() ? "flags" : section, ":\n");
    }
    const char* kind = "";
    switch (f.type) {
      case Type::kString: kind = "=STR"; break;
      case Type::kInt: kind = "=N"; break;
      case Type::kDouble: kind = "=X"; break;
      case Type::kDuration: kind = "=DURATION"; break;
      case Type::kBool: break;
    }
    std::string left = absl::StrCat("  --", f.name, kind);
    std::string right = f.help;
    if (!f.default_text.empty() && f.default_text != "0" && f.default_text != "false") {
      absl::StrAppend(&right, " (default ", f.default_text, ")");
    }
    if (left.size() < 28) {
      absl::StrAppend(&out, absl::StrFormat("%-28s%s\n", left, right));
    } else {
      absl::StrAppend(&out, left, "\n", std::string(28, ' '), right, "\n");
    }
  }
  return out;
}

}  // namespace blockd
